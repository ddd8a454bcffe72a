"""The draft forward at static shapes, so that a GPU can replay it as a CUDA graph.

Why: a 0.5B draft in eager PyTorch spends its forward launching kernels on a GPU (18-26 ms measured on an H100,
against vLLM's 4-5 ms target step with CUDA graphs). A CUDA graph replays a whole forward's kernels at once, but
only for the shapes and buffers it was captured with. So here a forward's rows are laid out on a fixed grid:

- ``R`` grid rows (the rows, padded to a power of two), ``W`` columns (the widest row's new tokens, padded to a
  power of two, at most :data:`MAX_STATIC_WIDTH`), ``L`` context slots (the cache slots a row reads, a power of
  two): one *bucket* ``(R, W, L)``, with its own input buffers and, on CUDA, its own graph, captured the first
  time the bucket is used and replayed after that;
- grid row ``b`` holds row ``b``'s new tokens at columns ``0..n``; its padding cells write their keys and values
  past the row's tokens (slots the row never reads as context before overwriting them), a padding row writes
  into a scratch cache row of its own. Every padding query sees only its own slot, no real query sees padding;
- the attention mask is built on the device from each row's context length and its new tokens' mask (a host-built
  ``[R, query heads, W, L]`` mask would cost more to copy than the forward);
- the lm_head runs at every cell (its argmax and, at each row's first read token, the second choice and both
  choices' probabilities): at these widths that costs little next to the launches a gather of the read rows
  would add.

The numbers equal :class:`~ouroboros_vllm.runtime.attention.PackedBatch`'s forward but for float rounding
(tests compare the drafted tokens on float32 models, on CPU, where the forward runs without a graph).
A cache resize (more rows or slots) moves its storage, and the graphs are captured again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ouroboros_vllm.algorithm.drafting import RUNNER_UP_ROW, ForwardArgmax, ForwardPlan
from ouroboros_vllm.runtime.argmax import argmax_last, runner_up
from ouroboros_vllm.runtime.attention import folded_attention, write_new_keys
from ouroboros_vllm.runtime.kv_cache import DraftKVCache

# Rows with more new tokens than this (a prompt's catch-up) take the packed forward: a prefill is bound by
# arithmetic, not by launches, and padding every row to its width would multiply the work.
MAX_STATIC_WIDTH = 64
_MIN_CONTEXT = 256


def bucket(n: int, least: int = 1) -> int:
    """The smallest power of two that is at least ``n`` and ``least``."""
    size = 1
    while size < n or size < least:
        size *= 2
    return size


@dataclass(frozen=True)
class _Inputs:
    """One bucket's input and output buffers (static: a captured graph reads and writes these very tensors)."""

    input_ids: torch.Tensor  # [1, R * W]
    positions: torch.Tensor  # [1, R * W]
    rows: torch.Tensor  # [R * W] cache row each cell writes to
    slots: torch.Tensor  # [R * W] slot each cell writes to
    grid_rows: torch.Tensor  # [R] cache row each grid row reads
    context: torch.Tensor  # [R] context slots of each grid row (all visible to its new tokens)
    new_mask: torch.Tensor  # [R, W, W] among each row's new tokens, True = attend
    heads: torch.Tensor  # [R] column of each row's first read token (where its second choice is read)
    out: torch.Tensor  # [R * W + R] the argmax at every cell, then each row's second choice
    probs: torch.Tensor  # [R, 2] float32: the probabilities of each row's first and second choice there

    @classmethod
    def allocate(cls, rows: int, width: int, device: torch.device) -> _Inputs:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        cells = rows * width
        return cls(
            input_ids=zeros(1, cells),
            positions=zeros(1, cells),
            rows=zeros(cells),
            slots=zeros(cells),
            grid_rows=zeros(rows),
            context=zeros(rows),
            new_mask=zeros(rows, width, width, dtype=torch.bool),
            heads=zeros(rows),
            out=zeros(cells + rows),
            probs=zeros(rows, 2, dtype=torch.float32),
        )


class StaticBatch:
    """What the attention function needs for a grid forward (see :func:`.attention.packed_cache_attention`)."""

    def __init__(self, cache: DraftKVCache, inputs: _Inputs, context_slots: int, query_group: int) -> None:
        self.cache = cache
        self.inputs = inputs
        self.length = context_slots
        num_rows, width = inputs.new_mask.shape[:2]
        # Built on the device, once per forward (inside the graph): context slots, then the new tokens' own mask.
        slot = torch.arange(context_slots, device=inputs.context.device)
        offset = slot[None, :] - inputs.context[:, None]  # [R, L] a slot's index among the row's new tokens
        is_new = (offset >= 0) & (offset < width)
        new_part = torch.gather(inputs.new_mask, 2, offset.clamp(0, width - 1)[:, None, :].expand(-1, width, -1))
        mask = (offset < 0)[:, None, :] | (new_part & is_new[:, None, :])  # [R, W, L]
        # Query (head h, token j) sits at h // group, (h % group) * width + j once the heads are folded.
        self.mask = mask[:, None, None].expand(-1, 1, query_group, -1, -1).reshape(num_rows, 1, -1, context_slots)

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        inputs = self.inputs
        keys, values = write_new_keys(self.cache, module.layer_idx, inputs.rows, inputs.slots, key, value)
        # A copy of the rows' first L slots (static shapes rule out views of varying length).
        keys, values = keys[inputs.grid_rows, :, : self.length], values[inputs.grid_rows, :, : self.length]
        return folded_attention(query[0].transpose(0, 1), keys, values, self.mask, scaling).unsqueeze(0)


class StaticForward:
    """The draft model's forward on bucketed grids; each bucket captured as a CUDA graph on a CUDA device."""

    def __init__(self, model: torch.nn.Module, cache: DraftKVCache, query_group: int) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.storage.device
        self.query_group = query_group
        self.use_graphs = self.device.type == "cuda"
        self._scratch_row = cache.acquire()  # padding rows write here
        self._inputs: dict[tuple[int, int, int], _Inputs] = {}
        self._graphs: dict[tuple[int, int, int], Any] = {}
        self._graph_pool: Any = None
        self._storage = cache.storage

    def forward(self, rows: Sequence[tuple[int, ForwardPlan]]) -> list[ForwardArgmax]:
        """One forward for these (cache row, plan) pairs, none wider than :data:`MAX_STATIC_WIDTH`; per row, the
        argmax at each token a plan reads (every logit row and phrase row), and the second choice and both
        choices' probabilities at its first."""
        width = bucket(max(plan.num_new for _, plan in rows))
        if width > MAX_STATIC_WIDTH:
            raise ValueError(f"a row with more than {MAX_STATIC_WIDTH} new tokens takes the packed forward")
        num_rows = bucket(len(rows))
        length = bucket(max(plan.cached for _, plan in rows) + width, _MIN_CONTEXT)
        self.cache.reserve(length)
        if self.cache.storage is not self._storage:  # resized: the graphs point at the old storage
            self._graphs.clear()
            # Their memory pool goes with them: a capture into a pool no graph holds any more fails inside
            # torch's caching allocator (seen on an H200, torch 2.11).
            self._graph_pool = None
            self._storage = self.cache.storage
        key = (num_rows, width, length)
        if key not in self._inputs:
            self._inputs[key] = _Inputs.allocate(num_rows, width, self.device)
        inputs = self._inputs[key]
        wanted = [plan.logit_rows + plan.phrase_rows() for _, plan in rows]
        self._fill(inputs, rows, wanted, num_rows, width)
        self._run(key, inputs, length)
        found = inputs.out.tolist()  # syncs
        probs = inputs.probs.tolist()
        cells = num_rows * width
        return [
            ForwardArgmax({**{i: found[b * width + i] for i in read}, RUNNER_UP_ROW: found[cells + b]}, tuple(probs[b]))
            for b, read in enumerate(wanted)
        ]

    def _fill(
        self,
        inputs: _Inputs,
        rows: Sequence[tuple[int, ForwardPlan]],
        wanted: list[list[int]],
        num_rows: int,
        width: int,
    ) -> None:
        """Lay the rows out on the grid (host arrays, one copy into each static buffer)."""
        ids = np.zeros((num_rows, width), dtype=np.int64)
        positions = np.zeros((num_rows, width), dtype=np.int64)
        cache_rows = np.full(num_rows, self._scratch_row, dtype=np.int64)
        context = np.zeros(num_rows, dtype=np.int64)
        new_mask = np.broadcast_to(np.eye(width, dtype=bool), (num_rows, width, width)).copy()  # padding: itself
        heads = np.zeros(num_rows, dtype=np.int64)
        for b, ((row, plan), read) in enumerate(zip(rows, wanted, strict=True)):
            n = plan.num_new
            ids[b, :n] = plan.input_ids
            positions[b, :n] = plan.positions
            cache_rows[b] = row
            context[b] = plan.cached
            new_mask[b, :n, :n] = plan.mask
            heads[b] = read[0] if read else 0
        slots = context[:, None] + np.arange(width)[None, :]
        for buffer, value in (
            (inputs.input_ids, ids.reshape(1, -1)),
            (inputs.positions, positions.reshape(1, -1)),
            (inputs.rows, np.repeat(cache_rows, width)),
            (inputs.slots, slots.reshape(-1)),
            (inputs.grid_rows, cache_rows),
            (inputs.context, context),
            (inputs.new_mask, new_mask),
            (inputs.heads, heads),
        ):
            buffer.copy_(torch.from_numpy(value), non_blocking=True)

    def _run(self, key: tuple[int, int, int], inputs: _Inputs, length: int) -> None:
        if not self.use_graphs:
            self._compute(inputs, length)
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(inputs, length)
        graph.replay()

    def _capture(self, inputs: _Inputs, length: int) -> Any:
        """Capture this bucket's forward (after a warm-up on a side stream, as CUDA graphs require)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._compute(inputs, length)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._compute(inputs, length)
        self._graph_pool = graph.pool()  # every bucket's graph shares one memory pool
        return graph

    def _compute(self, inputs: _Inputs, length: int) -> None:
        batch = StaticBatch(self.cache, inputs, length, self.query_group)
        hidden = self.model.get_decoder()(
            input_ids=inputs.input_ids, position_ids=inputs.positions, use_cache=False, packed_batch=batch
        ).last_hidden_state[0]
        logits = self.model.get_output_embeddings()(hidden)  # [R * W, vocab]
        best = argmax_last(logits)  # argmax, not topk: the same token on ties as the draft's greedy loop
        num_rows, width = inputs.new_mask.shape[:2]
        first = torch.arange(num_rows, device=self.device) * width + inputs.heads
        second, probs = runner_up(logits[first], best[first])
        inputs.out.copy_(torch.cat([best, second]))
        inputs.probs.copy_(probs)
