"""Drafting several requests in one forward of the draft model per step.

On a CPU a small draft model's forward is bound by reading its weights, so a forward that carries every row of
the batch costs little more than one that carries a single row; drafting row by row made batch size 8 slower
than plain decoding. Here the rows of one engine step share each draft forward:

- their caches are gathered into one batched cache, each row right-padded to the longest;
- each forward appends every row's new tokens, padded to the widest row, at the same new slots;
- a row's attention mask opens only its own live slots: its gathered context and the new slots it keeps
  (pending tokens, the matched phrase's tokens), never padding or the slots it drops (the other phrases, the
  lookahead window), which stay behind as holes that nobody attends to;
- when a row is done, its live slots are gathered back into its own cache, in token order.

Positions are explicit (each row's own), so the holes change nothing a token sees: each row's logits are those
of its own forward, up to floating-point summation order (and, with int8 weights, the activation scale, which
dynamic quantization computes over the whole forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ouroboros_vllm.draft_model import DraftSequence, ForwardPlan


class BatchedCache:
    """The rows' KV caches side by side; ``slots[b]`` are row ``b``'s live slots, in token order."""

    def __init__(self, seqs: Sequence[DraftSequence], model_config: Any) -> None:
        from transformers import DynamicCache

        self.seqs = list(seqs)
        lengths = [len(seq.ids) for seq in self.seqs]
        self.length = max(lengths)  # slots per row, live or not
        layers = []
        for index, first in enumerate(_layers(self.seqs[0])):
            _, heads, _, dim = first.keys.shape
            keys = first.keys.new_zeros(len(self.seqs), heads, self.length, dim)
            values = first.values.new_zeros(len(self.seqs), heads, self.length, first.values.shape[-1])
            for row, seq in enumerate(self.seqs):
                layer = _layers(seq)[index]
                if layer.keys.shape[-2] != lengths[row]:
                    raise AssertionError(f"draft cache holds {layer.keys.shape[-2]} slots for {lengths[row]} ids")
                keys[row, :, : lengths[row]] = layer.keys[0]
                values[row, :, : lengths[row]] = layer.values[0]
            layers.append((keys, values))
        self.cache = DynamicCache(layers, config=model_config)
        self.slots = [list(range(n)) for n in lengths]

    def add_forward(self, width: int, kept: Sequence[torch.Tensor], plans: Sequence[ForwardPlan]) -> None:
        """Record a forward of ``width`` new slots per row: row ``b`` keeps its local slots ``kept[b]`` (indices
        into its ``plan.cached`` context slots followed by its new tokens)."""
        for row, (indices, plan) in enumerate(zip(kept, plans, strict=True)):
            new = [self.length + i - plan.cached for i in indices.tolist() if i >= plan.cached]
            self.slots[row] = self.slots[row][: plan.cached] + new
        self.length += width

    def store_and_drop(self, rows: set[int]) -> None:
        """Give each row of ``rows`` its live slots back as its own cache, and take them out of the batch."""
        for row in sorted(rows):
            index = torch.tensor(self.slots[row], dtype=torch.long, device=self.cache.layers[0].keys.device)
            for mine, batched in zip(_layers(self.seqs[row]), self.cache.layers, strict=True):
                mine.keys = batched.keys[row : row + 1].index_select(-2, index)
                mine.values = batched.values[row : row + 1].index_select(-2, index)
        remaining = [row for row in range(len(self.seqs)) if row not in rows]
        if len(remaining) < len(self.seqs):
            index = torch.tensor(remaining, dtype=torch.long, device=self.cache.layers[0].keys.device)
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
            self.seqs = [self.seqs[row] for row in remaining]
            self.slots = [self.slots[row] for row in remaining]


def batch_inputs(
    plans: Sequence[ForwardPlan], slots: Sequence[Sequence[int]], cache_length: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids [B, q], position ids [B, q], attention mask [B, 1, q, cache_length + q]) of one forward.

    Row ``b`` carries ``plans[b]``'s inputs, right-padded to the widest row; its queries see the live cache
    slots ``slots[b]`` (its context) and its own new tokens as its plan lays them out. A padding query sees
    only itself, so that no softmax row is empty; nobody sees a padding token.
    """
    width = max(len(plan.input_ids) for plan in plans)
    input_ids = torch.zeros(len(plans), width, dtype=torch.long, device=device)
    positions = torch.zeros(len(plans), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(plans), 1, width, cache_length + width, dtype=torch.bool, device=device)
    for row, (plan, live) in enumerate(zip(plans, slots, strict=True)):
        n = len(plan.input_ids)
        if len(live) != plan.cached:
            raise AssertionError(f"row {row}: {len(live)} live slots for a context of {plan.cached} tokens")
        input_ids[row, :n] = torch.tensor(plan.input_ids, dtype=torch.long, device=device)
        positions[row, :n] = plan.positions
        if live:
            mask[row, 0, :n, torch.tensor(live, dtype=torch.long, device=device)] = plan.mask[:, : plan.cached]
        mask[row, 0, :n, cache_length : cache_length + n] = plan.mask[:, plan.cached :]
        padding = torch.arange(n, width, device=device)
        mask[row, 0, padding, cache_length + padding] = True
    return input_ids, positions, mask


def gather_logit_inputs(plans: Sequence[ForwardPlan]) -> tuple[list[int], list[int]]:
    """(row, column) of every input whose logits some row reads, row by row in each plan's order."""
    rows = [row for row, plan in enumerate(plans) for _ in plan.logit_rows]
    columns = [column for plan in plans for column in plan.logit_rows]
    return rows, columns


def _layers(seq: DraftSequence) -> list[Any]:
    assert seq.cache is not None
    return list(seq.cache.layers)
