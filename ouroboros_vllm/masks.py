"""Attention mask and position ids of a phrase-by-phrase draft forward (pure torch).

One forward of the draft model carries, after its cached context of ``cached`` tokens:

- the pending tokens (the request's tokens not yet in the draft's KV cache), causal among themselves;
- the lookahead window (:mod:`ouroboros_vllm.lookahead`), ``window_levels`` x ``window_width`` tokens, level
  by level: level 0 column ``i`` at position p0 + i sees level 0's columns up to ``i``; level ``l >= 1``
  column ``i`` at position p0 + i + l - 1 sees level 0's columns before ``i`` and levels 1..l of column ``i``
  (p0: the position after the last pending token);
- ``num_phrases`` pool phrases of ``phrase_len`` tokens each, all guesses of what follows the last pending
  token: each is placed at the positions right after it and sees the context, every pending token and its
  own earlier tokens, never another phrase (nor the window).

So every token's logits are exactly those of a plain forward over context + pending + its own trajectory:
the draft model checks several guesses of its own continuation, and refines the window, in one pass.
"""

from __future__ import annotations

import torch


def phrase_forward_layout(
    cached: int,
    num_pending: int,
    num_phrases: int,
    phrase_len: int,
    device: torch.device | None = None,
    *,
    window_levels: int = 0,
    window_width: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention mask [1, 1, q, cached + q] with True = attend, position ids [1, q]) for the forward."""
    window = window_levels * window_width
    q = num_pending + window + num_phrases * phrase_len
    p0 = cached + num_pending  # the position right after the last pending token
    mask = torch.zeros(q, cached + q, dtype=torch.bool, device=device)
    mask[:, :cached] = True  # everything sees the context
    pending = torch.tril(torch.ones(num_pending, num_pending, dtype=torch.bool, device=device))
    mask[:num_pending, cached:p0] = pending
    mask[num_pending:, cached:p0] = True  # the window and the phrases follow the last pending token
    positions = torch.empty(q, dtype=torch.long, device=device)
    positions[:num_pending] = torch.arange(cached, p0, device=device)

    def slot(level: int, column: int) -> int:  # the query index of a window token
        return num_pending + level * window_width + column

    for column in range(window_width):
        for level in range(window_levels):
            row = slot(level, column)
            if level == 0:
                seen = [slot(0, c) for c in range(column + 1)]
                positions[row] = p0 + column
            else:
                seen = [slot(0, c) for c in range(column)] + [slot(lv, column) for lv in range(1, level + 1)]
                positions[row] = p0 + column + level - 1
            mask[row, [cached + s for s in seen]] = True

    own = torch.tril(torch.ones(phrase_len, phrase_len, dtype=torch.bool, device=device))
    after_pending = torch.arange(p0, p0 + phrase_len, device=device)
    for j in range(num_phrases):
        start = num_pending + window + j * phrase_len
        mask[start : start + phrase_len, cached + start : cached + start + phrase_len] = own
        positions[start : start + phrase_len] = after_pending
    return mask[None, None], positions[None]


def kept_cache_indices(
    cached: int, num_pending: int, phrase_len: int, phrase: int | None, matched: int, window: int = 0
) -> torch.Tensor:
    """Cache slots to keep after the forward: context, pending tokens, and the matched phrase's first tokens
    (the window's ``window`` slots, between the pending tokens and the phrases, are dropped)."""
    keep = list(range(cached + num_pending))
    if phrase is not None and matched:
        start = cached + num_pending + window + phrase * phrase_len
        keep += range(start, start + matched)
    return torch.tensor(keep, dtype=torch.long)
