"""The token layout of one phrase-by-phrase draft forward: which new token sees which, and its position.

One forward of the draft model carries, after a row's cached context of ``cached`` tokens:

- the pending tokens (the request's tokens not yet in the draft's KV cache), causal among themselves;
- the lookahead window (:mod:`ouroboros_vllm.algorithm.lookahead`), ``window_levels`` x ``window_width`` tokens,
  level by level: level 0 column ``i`` at position p0 + i sees level 0's columns up to ``i``; level ``l >= 1``
  column ``i`` at position p0 + i + l - 1 sees level 0's columns before ``i`` and levels 1..l of column ``i``
  (p0: the position after the last pending token);
- ``num_phrases`` pool phrases of ``phrase_len`` tokens each, all guesses of what follows the last pending
  token: each is placed at the positions right after it and sees the context, every pending token and its
  own earlier tokens, never another phrase (nor the window).

So every token's logits are exactly those of a plain forward over context + pending + its own trajectory:
the draft model checks several guesses of its own continuation, and refines the window, in one pass.

The context is visible to every new token, so the layout only describes the new tokens: a ``[q, q]`` mask
and ``q`` position offsets from ``cached``. It depends on five small integers, so it is computed once per
shape and shared (the arrays are read-only).
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=256)
def forward_layout(
    num_pending: int, num_phrases: int, phrase_len: int, window_levels: int = 0, window_width: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(mask ``[q, q]`` among the new tokens, True = attend; position offsets ``[q]`` from ``cached``)."""
    window = window_levels * window_width
    q = num_pending + window + num_phrases * phrase_len
    mask = np.zeros((q, q), dtype=bool)
    offsets = np.empty(q, dtype=np.int64)
    mask[:num_pending, :num_pending] = np.tri(num_pending, dtype=bool)
    mask[num_pending:, :num_pending] = True  # the window and the phrases follow the last pending token
    offsets[:num_pending] = np.arange(num_pending)
    p0 = num_pending  # offset of the position right after the last pending token

    def slot(level: int, column: int) -> int:  # the new-token index of a window token
        return num_pending + level * window_width + column

    for column in range(window_width):
        for level in range(window_levels):
            row = slot(level, column)
            if level == 0:
                seen = [slot(0, c) for c in range(column + 1)]
                offsets[row] = p0 + column
            else:
                seen = [slot(0, c) for c in range(column)] + [slot(lv, column) for lv in range(1, level + 1)]
                offsets[row] = p0 + column + level - 1
            mask[row, seen] = True

    own = np.tri(phrase_len, dtype=bool)
    for j in range(num_phrases):
        start = num_pending + window + j * phrase_len
        mask[start : start + phrase_len, start : start + phrase_len] = own
        offsets[start : start + phrase_len] = np.arange(p0, p0 + phrase_len)
    mask.flags.writeable = False
    offsets.flags.writeable = False
    return mask, offsets


def kept_new_tokens(num_pending: int, phrase_len: int, phrase: int | None, matched: int, window: int = 0) -> list[int]:
    """The new tokens (indices among a forward's ``q``) whose K/V the draft cache keeps, in token order: every
    pending token, then the matched phrase's first ``matched`` tokens; the window's ``window`` tokens (between
    the pending tokens and the phrases) and the other phrases are dropped."""
    keep = list(range(num_pending))
    if phrase is not None and matched:
        start = num_pending + window + phrase * phrase_len
        keep += range(start, start + matched)
    return keep
