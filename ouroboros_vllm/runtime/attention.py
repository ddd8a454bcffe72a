"""Attention over the persistent draft cache, plugged into transformers' attention interface.

A draft forward packs every row's new tokens into one sequence (no padding: the linear layers, which are
most of a small model's forward, see each token once). transformers computes each token's query, key and
value with its own position (RoPE) and hands them to the registered attention function, which here

1. writes every new token's key and value into its row's next slots of :class:`DraftKVCache` (and copies a
   shared prompt prefix from the row that writes it to the rows that share it, :class:`SlotCopy`), and
2. attends: the rows with a few new tokens (drafting) together, in one ``scaled_dot_product_attention`` over
   a view of the cache rows they span, their queries padded to the widest of them; a row with many new tokens
   (a prompt's prefill) alone over a view of its own row, so that nobody pads to its width.

Each query sees what its row's mask says: the row's context and, among the new tokens, what its plan lays
out (phrases that see only themselves, the lookahead window's trajectories); never another row, padding or a
slot past its row's length. The query heads that share a key/value head are folded into the query length
(``[kv_heads, group * q, dim]``), so grouped-query attention reads each cached key once instead of copying it
per query head.

The batch reaches the attention function as a keyword argument of the model's forward (transformers passes
unknown keywords down to the attention function). No mask function is registered for our implementation, so
transformers builds no mask (it leaves masking to custom implementations); a plain forward without our batch
gets transformers' SDPA attention, causal: the model stays usable as is for a single unpadded sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ouroboros_vllm.runtime.kv_cache import DraftKVCache

ATTENTION_NAME = "ouroboros_draft_cache"

# A row with more new tokens than this attends alone: padding every other row's queries to its width would
# cost more than a call of its own.
MAX_SHARED_QUERIES = 64


@dataclass(frozen=True)
class RowSpec:
    """One row's part of a packed forward."""

    row: int  # cache row
    cached: int  # context slots before the new tokens
    mask: np.ndarray  # [new, new] among the new tokens, True = attend (the context is visible to all)

    @property
    def num_new(self) -> int:
        return self.mask.shape[0]


@dataclass(frozen=True)
class SlotCopy:
    """Slots ``start .. end`` of cache row ``source`` copied into row ``destination`` in each layer of a forward,
    after the forward wrote that layer's new keys and values: a prompt prefix shared with a row that reads it in
    the same forward (:mod:`.prefix_sharing`)."""

    source: int
    destination: int
    start: int
    end: int


@dataclass(frozen=True)
class _Group:
    """Rows attended in one call: cache rows ``first .. first + rows`` (a view), queries padded to ``width``."""

    first: int
    rows: int
    width: int
    length: int  # slots seen: the longest row's context and new tokens
    mask: torch.Tensor  # [rows, 1, group * width, length]
    packed: torch.Tensor  # [tokens] index of each of the group's tokens in the packed sequence
    padded: torch.Tensor  # [tokens] index of each in the group's flattened [rows * width] queries
    dense: slice | None  # the group's tokens, when they are already [rows * width] in the packed sequence


class PackedBatch:
    """What the attention function needs besides the model's tensors, computed once per forward."""

    def __init__(
        self,
        cache: DraftKVCache,
        specs: Sequence[RowSpec],
        query_group: int,
        copies: Sequence[SlotCopy] = (),
    ) -> None:
        device = cache.storage.device
        self.cache = cache
        self.copies = copies
        starts = np.cumsum([0] + [spec.num_new for spec in specs])
        self.rows = torch.from_numpy(np.repeat([s.row for s in specs], [s.num_new for s in specs])).to(device)
        self.slots = torch.from_numpy(np.concatenate([np.arange(s.cached, s.cached + s.num_new) for s in specs])).to(
            device
        )
        shared = [i for i, s in enumerate(specs) if s.num_new <= MAX_SHARED_QUERIES]
        alone = [i for i, s in enumerate(specs) if s.num_new > MAX_SHARED_QUERIES]
        self.groups = [
            _group([specs[i] for i in part], [int(starts[i]) for i in part], query_group, device)
            for part in ([shared] if shared else []) + [[i] for i in alone]
        ]

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        keys, values = write_new_keys(self.cache, module.layer_idx, self.rows, self.slots, key, value)
        for copy in self.copies:  # in order: a copy's source may be a row this forward writes, or fills by a copy
            for layer in (keys, values):
                layer[copy.destination, :, copy.start : copy.end] = layer[copy.source, :, copy.start : copy.end]
        tokens = query[0].transpose(0, 1)  # [tokens, heads, dim]
        out = torch.empty_like(tokens)
        for group in self.groups:
            if group.dense is not None:
                padded = tokens[group.dense]
            else:
                padded = tokens.new_zeros(group.rows * group.width, *tokens.shape[1:])
                padded[group.padded] = tokens[group.packed]
            rows = slice(group.first, group.first + group.rows)
            length = group.length
            attended = folded_attention(padded, keys[rows, :, :length], values[rows, :, :length], group.mask, scaling)
            if group.dense is not None:
                out[group.dense] = attended
            else:
                out[group.packed] = attended[group.padded]
        return out.unsqueeze(0)


def write_new_keys(
    cache: DraftKVCache, layer: int, rows: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a forward's new keys and values (``[1, kv_heads, tokens, dim]``) at each token's (cache row, slot) of
    layer ``layer``; return that layer's (keys, values)."""
    keys, values = cache.layer(layer)
    keys[rows, :, slots] = key[0].transpose(0, 1)
    values[rows, :, slots] = value[0].transpose(0, 1)
    return keys, values


def folded_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Attention of ``queries`` ``[rows * width, heads, dim]`` over ``keys`` and ``values`` ``[rows, kv_heads,
    length, dim]``, the query heads that share a key/value head folded into the query length (``mask``:
    ``[rows, 1, group * width, length]``); returns ``[rows * width, heads, dim]``."""
    num_rows, num_kv_heads = keys.shape[:2]
    tokens, num_heads, dim = queries.shape
    width, group = tokens // num_rows, num_heads // num_kv_heads
    q = queries.reshape(num_rows, width, num_kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    attended = F.scaled_dot_product_attention(
        q.reshape(num_rows, num_kv_heads, group * width, dim), keys, values, attn_mask=mask, scale=scaling
    )
    return (
        attended.view(num_rows, num_kv_heads, group, width, dim).permute(0, 3, 1, 2, 4).reshape(tokens, num_heads, dim)
    )


def _group(specs: Sequence[RowSpec], starts: Sequence[int], query_group: int, device: torch.device) -> _Group:
    first = min(s.row for s in specs)
    rows = max(s.row for s in specs) - first + 1
    width = max(s.num_new for s in specs)
    length = max(s.cached + s.num_new for s in specs)
    mask = np.zeros((rows, width, length), dtype=bool)
    mask[:, :, 0] = True  # padding queries see one slot, so that no softmax row is empty; their output is dropped
    packed, padded = [], []
    dense = len(specs) == rows and all(s.num_new == width for s in specs)  # every row, all as wide
    for position, (spec, start) in enumerate(zip(specs, starts, strict=True)):
        dense = dense and spec.row - first == position and start == starts[0] + position * width
        b, n = spec.row - first, spec.num_new
        mask[b, :n, : spec.cached] = True
        mask[b, :n, spec.cached : spec.cached + n] = spec.mask
        packed.append(np.arange(start, start + n))
        padded.append(np.arange(b * width, b * width + n))
    # Query (head h, token j) of a row sits at h // group, (h % group) * width + j after folding the heads.
    folded = np.broadcast_to(mask[:, None], (rows, query_group, width, length)).reshape(rows, 1, -1, length)
    return _Group(
        first=first,
        rows=rows,
        width=width,
        length=length,
        mask=torch.from_numpy(np.ascontiguousarray(folded)).to(device),
        packed=torch.from_numpy(np.concatenate(packed)).to(device),
        padded=torch.from_numpy(np.concatenate(padded)).to(device),
        dense=slice(starts[0], starts[0] + rows * width) if dense else None,
    )


class CacheBatch(Protocol):
    """A forward's layout over the draft cache: :class:`PackedBatch`, or the static grid of
    :class:`~ouroboros_vllm.runtime.static_forward.StaticBatch`."""

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor: ...


def packed_cache_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    packed_batch: CacheBatch | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention function signature: ``query`` is ``[1, heads, tokens, dim]``, ``key`` and
    ``value`` ``[1, kv_heads, tokens, dim]``; returns ``[1, tokens, heads, dim]``."""
    if packed_batch is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return packed_batch.attend(module, query, key, value, scaling), None


def register() -> None:
    """Make :data:`ATTENTION_NAME` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_cache_attention)
