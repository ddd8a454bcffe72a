"""The draft model's persistent KV cache: one preallocated tensor for every request, a row each.

Layout: ``[layers, 2 (keys, values), rows, kv_heads, capacity, head_dim]``. A request owns one row for its
whole life; its first ``n`` slots hold the keys and values of the ``n`` tokens its
:class:`~ouroboros_vllm.algorithm.drafting.DraftState` lists (the algorithm's ``len(ids)`` is the only length
there is). So:

- a forward writes a row's new tokens at slots ``n .. n + q`` and attends over the row's slots ``0 .. n + q``,
  a view of the cache, never a copy of it;
- a rejected draft costs nothing: the algorithm cuts ``ids`` back and the next forward writes over the tail;
- after a forward, the tokens a row keeps (a matched phrase, after its pending tokens) move into place with one
  copy of those few slots across every layer (:meth:`DraftKVCache.compact`).

Rows and capacity grow by doubling when a new request or a longer context needs them (a copy each time,
amortised); a finished request's row is reused by the next one, whose prompt may begin with what the row still
holds (see :mod:`.prefix_sharing`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MIN_CAPACITY = 256


class DraftKVCache:
    """Keys and values of every request's draft context; ``storage[layer, 0 | 1, row, head, slot, :]``."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        rows: int = 4,
        capacity: int = _MIN_CAPACITY,
    ) -> None:
        self.storage = torch.zeros(num_layers, 2, rows, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self._free = list(range(rows - 1, -1, -1))  # popped from the end: the lowest row first

    @property
    def num_rows(self) -> int:
        return self.storage.shape[2]

    @property
    def capacity(self) -> int:
        return self.storage.shape[4]

    @property
    def rows_in_use(self) -> int:
        return self.num_rows - len(self._free)

    def acquire(self, row: int | None = None) -> int:
        """A free row for a new request: ``row`` if given (it must be free), else the lowest free one (the cache
        grows when none is left)."""
        if row is not None:
            self._free.remove(row)  # ValueError when it is not free
            return row
        if not self._free:
            old = self.num_rows
            self._resize(rows=2 * old, capacity=self.capacity)
            self._free = list(range(2 * old - 1, old - 1, -1))
        return self._free.pop()

    def release(self, row: int) -> None:
        """Give a finished request's row back (its contents are overwritten by the next owner)."""
        if row in self._free or not 0 <= row < self.num_rows:
            raise ValueError(f"draft cache row {row} is not in use")
        self._free.append(row)

    def reserve(self, length: int) -> None:
        """Make room for ``length`` slots in every row."""
        if length > self.capacity:
            capacity = self.capacity
            while capacity < length:
                capacity *= 2
            self._resize(rows=self.num_rows, capacity=capacity)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each ``[rows, kv_heads, capacity, head_dim]`` (views)."""
        return self.storage[index, 0], self.storage[index, 1]

    def copy_slots(self, source: int, destination: int, start: int, end: int) -> None:
        """Copy slots ``start .. end`` of row ``source`` into row ``destination``, every layer (a shared prefix)."""
        self.reserve(end)
        self.storage[:, :, destination, :, start:end] = self.storage[:, :, source, :, start:end]

    def compact(self, row: int, start: int, kept: Sequence[int]) -> None:
        """After a forward that wrote a row's new tokens from slot ``start`` on: keep the new tokens ``kept``
        (indices among them, in order) at slots ``start, start + 1, ...`` in every layer."""
        moves = [(start + i, start + k) for i, k in enumerate(kept) if k != i]
        if not moves:
            return
        device = self.storage.device
        destination = torch.tensor([d for d, _ in moves], dtype=torch.long, device=device)
        source = torch.tensor([s for _, s in moves], dtype=torch.long, device=device)
        rows = self.storage[:, :, row]  # [layers, 2, heads, capacity, dim], a view
        rows.index_copy_(3, destination, rows.index_select(3, source))  # the gather copies first: overlap is safe

    def _resize(self, rows: int, capacity: int) -> None:
        old = self.storage
        layers, two, old_rows, heads, old_capacity, dim = old.shape
        self.storage = old.new_zeros(layers, two, rows, heads, capacity, dim)
        self.storage[:, :, :old_rows, :, :old_capacity] = old
