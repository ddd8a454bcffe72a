"""OuroborosProposer: vLLM's ``custom_class`` proposer contract, one loop over the batch rows.

vLLM builds one instance per worker process (``cls(vllm_config)``), calls ``load_model(target_model)`` once
and then ``propose(...)`` once per engine step for the whole batch, after the target verified the previous
step's drafts. The runner hooks (:mod:`ouroboros_vllm.vllm_hooks`) tell us, around that call, which request
each row holds, what the target predicted at every verified position and which requests finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger

from ouroboros_vllm import vllm_hooks
from ouroboros_vllm.config import OuroborosConfig
from ouroboros_vllm.draft_model import DraftModel, DraftSequence, resolve_dtype, resolve_model_path
from ouroboros_vllm.stats import DraftStats, StatsLogger

logger = init_logger(__name__)


@dataclass
class RequestState:
    """Everything the proposer keeps for one request; dropped when the request finishes or is aborted."""

    draft: DraftSequence = field(default_factory=DraftSequence)
    stats: DraftStats = field(default_factory=DraftStats)
    proposed: list[int] = field(default_factory=list)  # last proposal, to count what the target accepted


class OuroborosProposer(vllm_hooks.StepListener):
    """Drafts for each running request with the draft model; ``propose`` returns at most K ids per row."""

    def __init__(self, vllm_config: VllmConfig) -> None:
        # Also done by the plugin entry point; repeated here so an allow-list (VLLM_PLUGINS) that leaves the
        # plugin out cannot leave the proposer without its hooks.
        vllm_hooks.install()
        spec_config = vllm_config.speculative_config
        assert spec_config is not None and spec_config.num_speculative_tokens is not None
        self.config = OuroborosConfig.from_additional_config(vllm_config.additional_config)
        self.num_speculative_tokens = int(spec_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.target_tokenizer = vllm_config.model_config.tokenizer
        self.target_dtype = vllm_config.model_config.dtype
        assert self.config.draft_model is not None  # OuroborosConfig requires it for greedy drafting
        self.draft_path = resolve_model_path(self.config.draft_model)  # a missing folder fails at start-up

        self.drafter: DraftModel | None = None
        self.requests: dict[str, RequestState] = {}
        self.stats = DraftStats()
        self._stats_logger = StatsLogger(self.config.stats_log_interval_s, logger)
        self._batch_req_ids: list[str] | None = None
        self._skipped_out_of_vocab: set[str] = set()

    def load_model(self, target_model: torch.nn.Module) -> None:
        device = next(target_model.parameters()).device
        dtype = resolve_dtype(self.config.draft_dtype, self.target_dtype)
        self.drafter = DraftModel.load(self.draft_path, target_tokenizer=self.target_tokenizer, device=device, dtype=dtype)

    # ---- reports from the runner hooks -------------------------------------------------------------------

    def on_requests_finished(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                logger.debug("ouroboros-vllm: request %s done: %s", req_id, state.stats.summary())
            self._skipped_out_of_vocab.discard(req_id)

    def on_batch(self, req_ids: list[str]) -> None:
        self._batch_req_ids = req_ids

    def on_verified(self, req_ids: list[str], drafts: list[list[int]], target_argmax: list[list[int]]) -> None:
        for req_id, draft in zip(req_ids, drafts, strict=True):
            state = self.requests.get(req_id)
            if state is not None and draft:
                state.stats.verified_rounds += 1
                state.stats.verified_tokens += len(draft)
                self.stats.verified_rounds += 1
                self.stats.verified_tokens += len(draft)

    # ---- the custom_class contract -------------------------------------------------------------------------

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,  # vLLM passes the target's KV slots; our draft keeps its own cache
    ) -> list[list[int]]:
        req_ids = self._take_batch_req_ids(len(sampled_token_ids))
        proposals: list[list[int]] = []
        for row, (req_id, sampled) in enumerate(zip(req_ids, sampled_token_ids, strict=True)):
            num_tokens = int(num_tokens_no_spec[row])
            state = self.requests.setdefault(req_id, RequestState())
            self._count_accepted(state, sampled)
            # Rows still in (chunked) prefill sampled nothing: there is no next token to draft after yet.
            # Near max_model_len, a draft must leave room for the target's own token.
            budget = min(self.num_speculative_tokens, self.max_model_len - num_tokens - 1)
            if not sampled or budget <= 0:
                state.proposed = []
                proposals.append([])
                continue
            history = token_ids_cpu[row, :num_tokens]
            state.proposed = self._draft(req_id, state, history, budget)
            proposals.append(state.proposed)
        self._stats_logger.maybe_log(self.stats)
        return proposals

    def _draft(self, req_id: str, state: RequestState, history: np.ndarray, budget: int) -> list[int]:
        assert self.drafter is not None, "load_model() was not called"
        if not self.drafter.fits(history):
            # A token id past the draft's embedding table (the target's vocabulary can be padded larger):
            # no draft for this request rather than a crash of the engine.
            if req_id not in self._skipped_out_of_vocab:
                self._skipped_out_of_vocab.add(req_id)
                logger.warning("ouroboros-vllm: request %s holds token ids outside the draft's vocabulary "
                               "of %d; not drafting for it", req_id, self.drafter.vocab_size)
            return []
        start = time.perf_counter()
        draft = self.drafter.greedy(state.draft, history, budget)
        round_stats = DraftStats(
            rounds=1,
            proposed_tokens=len(draft),
            draft_forwards=len(draft),  # greedy: one forward per drafted token
            draft_seconds=time.perf_counter() - start,
        )
        state.stats.add(round_stats)
        self.stats.add(round_stats)
        return draft

    def _count_accepted(self, state: RequestState, sampled: list[int]) -> None:
        # vLLM returns the accepted draft prefix plus one token of the target's for a verified row.
        if state.proposed and sampled:
            accepted = min(len(sampled) - 1, len(state.proposed))
            state.stats.accepted_tokens += accepted
            self.stats.accepted_tokens += accepted

    def _take_batch_req_ids(self, num_rows: int) -> list[str]:
        req_ids, self._batch_req_ids = self._batch_req_ids, None
        if req_ids is None or len(req_ids) != num_rows:
            raise RuntimeError(
                "OuroborosProposer.propose() was called without the request ids of its batch rows: the "
                "ouroboros-vllm runner hooks are not installed in this process (is the plugin disabled by "
                f"VLLM_PLUGINS?), or this vLLM calls propose() differently (rows: {num_rows}, ids: {req_ids})"
            )
        return req_ids
