"""How many tokens requests emit: what a running request may still emit.

A request's ``max_tokens`` bounds its answer, but most answers end earlier, at an end of sequence (at batch 8 on
the benchmark's translation and QA prompts, 22-24 tokens of 64). What a request will still emit decides whether
the draft's catch-up on its prompt can pay back (:func:`~ouroboros_vllm.algorithm.step_plans.catch_up_pays`): priced
over ``max_tokens``, a request with a short answer gets its prompt read for nothing. So the process keeps what
recent requests emitted in all, and a running request that has emitted ``n`` tokens is expected to emit what the
recent requests that got past ``n`` emitted after it (the mean residual length), at most its own limit.
"""

from __future__ import annotations

import bisect
from collections import deque

WINDOW = 64  # finished requests remembered
# Fewer finished requests than this say too little (an engine's warm-up request, 8 tokens, made every answer look
# as if it would end within 8 tokens, and every long prompt's catch-up look unpaid): the limit is assumed instead.
MIN_FINISHED = 8


class OutputLengths:
    """The output lengths of the last ``window`` finished requests."""

    def __init__(self, window: int = WINDOW) -> None:
        self._recent: deque[int] = deque(maxlen=window)
        self._sorted: list[int] = []
        self._suffix_sums: list[int] = [0]  # _suffix_sums[i] = sum(_sorted[i:])

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, emitted: int) -> None:
        """A request finished after emitting ``emitted`` tokens."""
        self._recent.append(emitted)
        self._sorted = sorted(self._recent)
        sums = [0]
        for length in reversed(self._sorted):
            sums.append(sums[-1] + length)
        self._suffix_sums = sums[::-1]

    def expected_remaining(self, emitted: int, limit: int | None) -> float | None:
        """Tokens a request that has emitted ``emitted`` may still emit, at most ``limit`` (None: no limit known):
        the mean of what the recent requests that emitted more went on to emit after ``emitted``. When none did,
        as many as it has emitted (an answer that outlived every recent one is as likely to end soon as to run on
        as long again; the limit would assume it runs to the end); with fewer than :data:`MIN_FINISHED` requests
        finished, ``limit``."""
        if len(self._sorted) < MIN_FINISHED:
            return limit
        first = bisect.bisect_right(self._sorted, emitted)
        longer = len(self._sorted) - first
        mean = (self._suffix_sums[first] - longer * emitted) / longer if longer else float(emitted)
        return mean if limit is None else min(mean, limit)
