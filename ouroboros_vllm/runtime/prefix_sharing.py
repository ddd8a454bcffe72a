"""Prompt prefixes shared between the draft cache's rows: the draft model's counterpart of vLLM's prefix caching.

A new request's prompt often begins with what a row of the draft's cache already holds: a chat template's system
prompt (24-35 tokens of every chat prompt in the benchmarks, half of a short question's), a few-shot preamble
(MBPP's three solved examples: 600 of its 660-900 tokens). Reading it again is most of the draft's catch-up on
such a prompt, and what the catch-up costs decides whether drafting for a request pays at all. So before a
step's first draft forward, each round that catches up starts from the longest prefix of its history a row holds:

- a free row (a finished request's: its slots stay valid until the row is reused), taken as the round's own row
  when the round has none yet: nothing is copied;
- a live request's row, or a free row when the round already has one: its slots are copied once, every layer;
- a row that reads the same prefix in this very forward (requests that arrive together): copied layer by layer
  inside that forward, right after the layer's keys and values are written (:class:`~.attention.SlotCopy`).

A token's key and value depend on the tokens before it only, so a copied slot holds what the row would have
computed itself (with int8 weights, up to the per-forward activation scale, as between any two forwards).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ouroboros_vllm.algorithm.drafting import DraftRound, DraftState, common_prefix_length
from ouroboros_vllm.runtime.attention import SlotCopy
from ouroboros_vllm.runtime.kv_cache import DraftKVCache

MIN_SHARED = 16  # tokens: a shorter common prefix is read again rather than copied


class PrefixIndex:
    """Which request owns each row of the draft cache, and which tokens each free row still holds."""

    def __init__(self, cache: DraftKVCache) -> None:
        self.cache = cache
        self._owners: dict[int, DraftState] = {}  # row -> the live request's state (its ids are the row's tokens)
        self._freed: dict[int, np.ndarray] = {}  # free row -> the tokens its slots still hold

    def acquire(self, state: DraftState, row: int | None = None) -> int:
        """Give ``state`` a cache row (``row``, a free one, if given) unless it has one."""
        if state.cache_row is None:
            state.cache_row = self.cache.acquire(row)
            self._freed.pop(state.cache_row, None)
            self._owners[state.cache_row] = state
        return state.cache_row

    def release(self, state: DraftState) -> None:
        """The request is done: its row goes back to the cache, still holding its tokens for the next owner."""
        if state.cache_row is None:
            return
        self.cache.release(state.cache_row)
        self._owners.pop(state.cache_row, None)
        if len(state.ids) >= MIN_SHARED:
            self._freed[state.cache_row] = np.asarray(state.ids)
        state.cache_row = None

    def shareable(self, history: np.ndarray) -> int:
        """Tokens at the start of ``history`` that some row holds now (what a catch-up would not read)."""
        return self._longest(history, [])[1]

    def catch_ups(self, histories: Sequence[np.ndarray], cached: Sequence[int]) -> list[float]:
        """What each row's catch-up reads if these rows catch up together (row i's cache holds ``cached[i]`` of
        its history): its history, less (for a prompt) the longest prefix a row holds now, less all but a share of
        a longer prefix it has in common with other prompts here. That one is read once, by one of them: each of
        the ``k`` rows that have it is charged ``1/k`` of it (MBPP's requests arriving together: 600 tokens in
        common)."""
        # Only a prompt is looked up (a row whose cache holds nothing yet): a row that stopped drafting for a
        # while lacks its own generated text, which no other row holds, and looking costs per row and step.
        prompts = [i for i, (h, c) in enumerate(zip(histories, cached, strict=True)) if c == 0 and len(h) > MIN_SHARED]
        held = list(cached)
        for i in prompts:
            held[i] = self.shareable(histories[i])
        result = [float(len(h) - k) for h, k in zip(histories, held, strict=True)]
        long = [i for i in prompts if len(histories[i]) - held[i] > MIN_SHARED]
        for i in long:
            common = [common_prefix_length(histories[j], histories[i]) - held[i] for j in long if j != i]
            sharers = [length for length in common if length >= MIN_SHARED]
            if sharers:
                shared = min(max(sharers), len(histories[i]) - 1 - held[i])
                result[i] -= shared * len(sharers) / (len(sharers) + 1)
        return result

    def share(self, rounds: Sequence[DraftRound]) -> list[SlotCopy]:
        """Before the rounds' first forward: give every round a row, and each that catches up by more than
        :data:`MIN_SHARED` tokens the longest prefix of its history any row holds or the forward writes. Returns
        the copies the forward makes layer by layer, in order (a source may itself be filled by a copy)."""
        copies: list[SlotCopy] = []
        written: list[tuple[int, np.ndarray]] = []  # (row, history) of the rounds this forward catches up
        for round_ in rounds:
            state, history = round_.state, round_.history
            cached = len(state.ids)
            if len(history) - cached > MIN_SHARED:
                source, length = self._longest(history, written, exclude=state.cache_row)
                length = min(length, len(history) - 1)
                if source is not None and length - cached >= MIN_SHARED:
                    if state.cache_row is None and source in self._freed:
                        self.acquire(state, row=source)  # the row holds the prefix already
                    elif any(row == source for row, _ in written):
                        copies.append(SlotCopy(source, self.acquire(state), cached, length))
                    else:
                        self.cache.copy_slots(source, self.acquire(state), cached, length)
                    round_.adopt_prefix(length)
                written.append((self.acquire(state), history))
            self.acquire(state)
        return copies

    def _longest(
        self, history: np.ndarray, written: Sequence[tuple[int, np.ndarray]], exclude: int | None = None
    ) -> tuple[int | None, int]:
        """The row holding the longest prefix of ``history`` (now, or once ``written`` rows are written), and
        its length; (None, 0) when no row shares a first token."""
        held = [(row, state.ids) for row, state in self._owners.items()]
        held += list(self._freed.items()) + list(written)
        best, best_length = None, 0
        for row, ids in held:
            if row != exclude and len(ids) and len(history) and ids[0] == history[0]:
                length = common_prefix_length(ids, history)
                if length > best_length:
                    best, best_length = row, length
        return best, best_length
