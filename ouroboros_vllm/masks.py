"""Attention mask and position ids of a phrase-by-phrase draft forward (pure torch).

One forward of the draft model carries, after its cached context of ``cached`` tokens:

- the pending tokens (the request's tokens not yet in the draft's KV cache), causal among themselves;
- ``num_phrases`` pool phrases of ``phrase_len`` tokens each, all guesses of what follows the last pending
  token: each is placed at the positions right after it and sees the context, every pending token and its
  own earlier tokens, never another phrase.

So every phrase token's logits are exactly those of a plain forward over context + pending + that phrase's
prefix: the draft model verifies several guesses of its own continuation in one pass.
"""

from __future__ import annotations

import torch


def phrase_forward_layout(
    cached: int, num_pending: int, num_phrases: int, phrase_len: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention mask [1, 1, q, cached + q] with True = attend, position ids [1, q]) for the forward."""
    q = num_pending + num_phrases * phrase_len
    mask = torch.zeros(q, cached + q, dtype=torch.bool, device=device)
    mask[:, :cached] = True  # everything sees the context
    pending = torch.tril(torch.ones(num_pending, num_pending, dtype=torch.bool, device=device))
    mask[:num_pending, cached : cached + num_pending] = pending
    mask[num_pending:, cached : cached + num_pending] = True  # phrases follow the last pending token
    own = torch.tril(torch.ones(phrase_len, phrase_len, dtype=torch.bool, device=device))
    positions = torch.empty(q, dtype=torch.long, device=device)
    positions[:num_pending] = torch.arange(cached, cached + num_pending, device=device)
    after_pending = torch.arange(cached + num_pending, cached + num_pending + phrase_len, device=device)
    for j in range(num_phrases):
        start = num_pending + j * phrase_len
        mask[start : start + phrase_len, cached + start : cached + start + phrase_len] = own
        positions[start : start + phrase_len] = after_pending
    return mask[None, None], positions[None]


def kept_cache_indices(cached: int, num_pending: int, phrase_len: int, phrase: int | None, matched: int) -> torch.Tensor:
    """Cache slots to keep after the forward: context, pending tokens, and the matched phrase's first tokens."""
    keep = list(range(cached + num_pending))
    if phrase is not None and matched:
        start = cached + num_pending + phrase * phrase_len
        keep += range(start, start + matched)
    return torch.tensor(keep, dtype=torch.long)
