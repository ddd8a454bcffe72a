"""The oracle: a ``custom_class`` proposer that proposes the known plain-greedy continuation.

Every draft it makes is accepted (the target verifies its own greedy output), so its speed is the ceiling of
speculative decoding for this engine, K and machine: what a perfect drafter that costs nothing would reach.
It lives here, not in the product package, because it needs the answers in advance.

The answers come from a JSON file written by the benchmark after the plain run, named in
``additional_config["oracle"]["references"]``::

    {"references": [{"prompt_token_ids": [...], "output_token_ids": [...]}, ...]}

``propose`` gets no request ids, only each row's token history; the row's reference is the one whose prompt is
a prefix of that history (see ``ReferenceIndex``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ouroboros_vllm.algorithm.stats import DraftStats

CONFIG_KEY = "oracle"


class ReferenceIndex:
    """Reference sequences (prompt + plain output), found from a token history that starts with the prompt.

    References are grouped by prompt length, so a lookup is one dict probe per distinct prompt length, longest
    first (a prompt that extends another prompt is the more specific match).
    """

    def __init__(self, references: Iterable[tuple[Sequence[int], Sequence[int]]]) -> None:
        self._by_length: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for prompt, output in references:
            prompt = tuple(int(t) for t in prompt)
            self._by_length.setdefault(len(prompt), {})[prompt] = [*prompt, *(int(t) for t in output)]
        self._lengths = sorted(self._by_length, reverse=True)

    def __len__(self) -> int:
        return sum(len(table) for table in self._by_length.values())

    @classmethod
    def load(cls, path: str | Path) -> ReferenceIndex:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls((ref["prompt_token_ids"], ref["output_token_ids"]) for ref in data["references"])

    @staticmethod
    def write(path: str | Path, references: Iterable[tuple[Sequence[int], Sequence[int]]]) -> None:
        payload = {
            "references": [
                {"prompt_token_ids": list(prompt), "output_token_ids": list(output)} for prompt, output in references
            ]
        }
        Path(path).write_text(json.dumps(payload), encoding="utf-8")

    def continuation(self, history: Sequence[int], max_tokens: int) -> list[int]:
        """The next ``max_tokens`` reference tokens after ``history``; empty when no reference matches it.

        A history that left its reference (which greedy decoding should never do) gets no proposal, so the
        target decides alone from there and the benchmark's output check reports the difference.
        """
        history = list(history)
        n = len(history)
        for length in self._lengths:
            if length > n:
                continue
            full = self._by_length[length].get(tuple(history[:length]))
            if full is not None and n <= len(full) and full[length:n] == history[length:]:
                return full[n : n + max_tokens]
        return []


class OracleProposer:
    """vLLM ``custom_class`` proposer proposing up to K tokens of each row's reference continuation."""

    def __init__(self, vllm_config: Any) -> None:
        section = (vllm_config.additional_config or {}).get(CONFIG_KEY) or {}
        if "references" not in section:
            raise ValueError(
                f'the oracle needs additional_config["{CONFIG_KEY}"]["references"]: a references JSON file'
            )
        self.index = ReferenceIndex.load(section["references"])
        self.num_speculative_tokens = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.stats = DraftStats()  # same counters as our proposer, so the benchmark reads both alike

    def load_model(self, target_model: Any) -> None:
        """vLLM's CPU runner calls this unconditionally; the oracle has no model."""

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        start = time.perf_counter()
        proposals: list[list[int]] = []
        for row, sampled in enumerate(sampled_token_ids):
            num_tokens = int(num_tokens_no_spec[row])
            # A row still in (chunked) prefill sampled nothing; near max_model_len leave room for the target's token.
            budget = min(self.num_speculative_tokens, self.max_model_len - num_tokens - 1)
            if not sampled or budget <= 0:
                proposals.append([])
                continue
            proposals.append(self.index.continuation(token_ids_cpu[row, :num_tokens].tolist(), budget))
        self.stats.add(
            DraftStats(
                rounds=sum(1 for p in proposals if p),
                proposed_tokens=sum(len(p) for p in proposals),
                draft_seconds=time.perf_counter() - start,
            )
        )
        return proposals
