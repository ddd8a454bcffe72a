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
from ouroboros_vllm.draft_model import (
    DraftModel,
    DraftRow,
    DraftSequence,
    resolve_precision,
    resolve_model_path,
    tokenizer_vocab,
)
from ouroboros_vllm.metrics import MetricsExporter
from ouroboros_vllm.pool import PhrasePool, max_phrases_for_memory
from ouroboros_vllm.pool_file import PoolFile, PoolIdentity, tokenizer_fingerprint
from ouroboros_vllm.proposal import Proposal, apply_feedback, context_ngrams, lengthen
from ouroboros_vllm.stats import DraftStats, StatsLogger

logger = init_logger(__name__)

# The per-request option, in SamplingParams(extra_args=...) or the OpenAI API's "vllm_xargs" (flat scalars only).
POOL_OPTION = "ouroboros_pool"
POOL_CHOICES = ("shared", "cold")


@dataclass
class RequestState:
    """Everything the proposer keeps for one request; dropped when the request finishes or is aborted."""

    draft: DraftSequence = field(default_factory=DraftSequence)
    stats: DraftStats = field(default_factory=DraftStats)
    proposal: Proposal = field(default_factory=Proposal)  # last proposal, awaiting or after verification
    pool: PhrasePool | None = None  # the request's own pool when warm_start is off or the request is cold
    cold: bool = False  # drafts from a pool of its own: asked for (ouroboros_pool="cold"), or seeded sampling
    pooled_upto: int = 0  # the request's tokens up to here have given their N-grams to the pool


@dataclass(eq=False)
class _Round:
    """A request that drafts in this step: its token history and how many tokens it may propose."""

    req_id: str
    state: RequestState
    history: np.ndarray
    budget: int
    row: DraftRow | None = None  # the draft model's part, when it drafts for this request


class OuroborosProposer(vllm_hooks.StepListener):
    """Drafts for each running request and lengthens the draft from the shared phrase pool.

    ``propose`` returns at most K (``num_speculative_tokens``) ids per row: up to gamma tokens from the draft
    model (the trunk), then pool phrases keyed by the chain's last token. One pool per process serves every
    request (warm start).
    """

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
        self.config.check_against(self.num_speculative_tokens)
        self.gamma = self.config.gamma_for(self.num_speculative_tokens)
        # A missing draft folder fails here, at engine start, rather than at load_model.
        self.draft_path = None
        if self.config.uses_draft_model:
            assert self.config.draft_model is not None  # the config requires it
            self.draft_path = resolve_model_path(self.config.draft_model)

        self.pool = self._new_pool()  # the shared pool (warm start)
        self.pool_file: PoolFile | None = None
        if self.config.pool_path is not None:
            identity = PoolIdentity(
                tokenizer=tokenizer_fingerprint(tokenizer_vocab(self.target_tokenizer)),
                target=str(vllm_config.model_config.model),
                draft=self.config.draft_model or "",
            )
            self.pool_file = PoolFile(self.config.pool_path, identity, self.config.pool_save_interval_s)
            loaded = self.pool_file.load_into(self.pool)
            logger.info("ouroboros-vllm: %d phrases loaded from %s", loaded, self.pool_file.path)
            self.pool_file.save_at_exit(self.pool)
        self.drafter: DraftModel | None = None
        self.requests: dict[str, RequestState] = {}
        self.stats = DraftStats()
        self._stats_logger = StatsLogger(self.config.stats_log_interval_s, logger)
        model_config = vllm_config.model_config
        self._metrics = MetricsExporter(str(getattr(model_config, "served_model_name", None) or model_config.model))
        self._batch_req_ids: list[str] | None = None
        self._skipped_out_of_vocab: set[str] = set()

    def summary(self) -> str:
        """The process-wide stats in one line (logged every ``stats_log_interval_s``, printed by the demo)."""
        line = self.stats.summary()
        return f"{line}; {self.pool.summary()}" if self.config.uses_pool else line

    def _new_pool(self) -> PhrasePool:
        return PhrasePool(
            phrase_len=self.config.phrase_len,
            max_phrases_per_key=self.config.max_phrases_per_key,
            max_keys=self.config.pool_max_keys,
            max_phrases=max_phrases_for_memory(self.config.pool_memory_mib, self.config.phrase_len),
        )

    def _pool_of(self, state: RequestState) -> PhrasePool:
        if self.config.warm_start and not state.cold:
            return self.pool
        if state.pool is None:
            state.pool = self._new_pool()
        return state.pool

    def load_model(self, target_model: torch.nn.Module) -> None:
        if self.draft_path is None:  # pool_only: no draft model
            return
        device = next(target_model.parameters()).device
        precision = resolve_precision(self.config.draft_dtype, self.target_dtype, device)
        self.drafter = DraftModel.load(
            self.draft_path, target_tokenizer=self.target_tokenizer, device=device, precision=precision)

    # ---- reports from the runner hooks -------------------------------------------------------------------

    def on_requests_finished(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                logger.debug("ouroboros-vllm: request %s done: %s", req_id, state.stats.summary())
            self._skipped_out_of_vocab.discard(req_id)
        self._push_metrics()

    def on_requests_added(self, sampling_params: dict[str, Any]) -> None:
        for req_id, params in sampling_params.items():
            self.requests.setdefault(req_id, RequestState()).cold = self._wants_own_pool(req_id, params)

    def _wants_own_pool(self, req_id: str, params: Any) -> bool:
        """Cold when asked for; by default also for seeded sampling: vLLM's rejection sampler draws one random
        number per draft token, so drafts that depended on other requests (the shared pool) would make a
        seeded output depend on the traffic around it."""
        extra_args = getattr(params, "extra_args", None) or {}
        seeded_sampling = getattr(params, "seed", None) is not None and getattr(params, "temperature", 0.0) > 0
        choice = extra_args.get(POOL_OPTION)
        if choice is None:
            return seeded_sampling
        if choice not in POOL_CHOICES:
            # The worker cannot reject a request without failing the whole batch: say so and go on.
            logger.warning("ouroboros-vllm: request %s: extra_args %s=%r is not one of %s; using the default",
                           req_id, POOL_OPTION, choice, ", ".join(repr(c) for c in POOL_CHOICES))
            return seeded_sampling
        return choice == "cold"

    def on_batch(self, req_ids: list[str]) -> None:
        self._batch_req_ids = req_ids

    def on_verified(self, req_ids: list[str], drafts: list[list[int]], target_argmax: list[list[int]]) -> None:
        for req_id, draft, argmax in zip(req_ids, drafts, target_argmax, strict=True):
            state = self.requests.get(req_id)
            if state is None or not draft:
                continue
            self._record(state, DraftStats(verified_rounds=1, verified_tokens=len(draft)))
            if self.config.uses_pool:
                apply_feedback(self._pool_of(state), state.proposal, draft, argmax)

    # ---- the custom_class contract -------------------------------------------------------------------------

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,  # vLLM passes the target's KV slots; our draft keeps its own cache
    ) -> list[list[int]]:
        req_ids = self._take_batch_req_ids(len(sampled_token_ids))
        rounds: list[_Round] = []
        for row, (req_id, sampled) in enumerate(zip(req_ids, sampled_token_ids, strict=True)):
            num_tokens = int(num_tokens_no_spec[row])
            state = self.requests.setdefault(req_id, RequestState())
            self._count_accepted(state, sampled)
            state.proposal = Proposal()
            # Rows still in (chunked) prefill sampled nothing: there is no next token to draft after yet.
            # Near max_model_len, a draft must leave room for the target's own token.
            budget = min(self.num_speculative_tokens, self.max_model_len - num_tokens - 1)
            if sampled and budget > 0:
                history = token_ids_cpu[row, :num_tokens]
                self._feed_context(state, history)
                rounds.append(_Round(req_id, state, history, budget))
        self._propose(rounds)
        proposals = [state.proposal.tokens for state in (self.requests[req_id] for req_id in req_ids)]
        self._stats_logger.maybe_log(self.summary)
        self._push_metrics()
        if self.pool_file is not None:
            self.pool_file.maybe_save(self.pool)
        return proposals

    def _push_metrics(self) -> None:
        self._metrics.push(self.stats, self.pool if self.config.uses_pool else None, len(self.requests))

    def _feed_context(self, state: RequestState, history: np.ndarray) -> None:
        if self.config.uses_pool and self.config.context_ngrams:
            self._pool_of(state).insert_many(context_ngrams(history, state.pooled_upto, self.config.phrase_len))
            state.pooled_upto = len(history)

    def _propose(self, rounds: list[_Round]) -> None:
        """Draft for every round's request (the draft model's trunk), then lengthen each from the pool."""
        start = time.perf_counter()
        if self.drafter is not None:
            drafting = [r for r in rounds if self._draftable(r.req_id, r.history)]
            for r in drafting:
                r.row = self._draft_row(r)
            shared = [r.row for r in drafting if r.row is not None and not r.state.cold]
            # Cold requests draft alone: with int8 weights a forward's numbers depend on every row in it, and a
            # cold (e.g. seeded) request's drafts must not depend on other traffic.
            alone = [[r.row] for r in drafting if r.row is not None and r.state.cold]
            groups = [shared] if self.config.batch_draft else [[row] for row in shared]
            for group in [*groups, *alone]:
                if group:
                    self.drafter.draft_rows(group)
            for r in drafting:
                assert r.row is not None
                r.state.proposal = Proposal(tokens=r.row.drafted, trunk_len=len(r.row.drafted))
        seconds = (time.perf_counter() - start) / max(len(rounds), 1)  # the step's drafting, shared evenly
        for r in rounds:
            proposal = r.state.proposal
            ends_sequence = bool(proposal.tokens) and proposal.tokens[-1] in self._eos_token_ids()
            if self.config.uses_pool and not ends_sequence:  # nothing follows an end of sequence
                lengthen(self._pool_of(r.state), proposal, int(r.history[-1]), r.budget, self.config.num_candidates)
            self._record(r.state, DraftStats(
                rounds=1,
                proposed_tokens=len(proposal.tokens),
                suffix_tokens=len(proposal.tokens) - proposal.trunk_len,
                draft_forwards=r.row.forwards if r.row is not None else 0,
                draft_seconds=seconds,
            ))

    def _draft_row(self, r: _Round) -> DraftRow:
        """The draft model's job for one request: ``gamma`` tokens (fewer near the budget), phrase by phrase in
        'ouroboros' mode, one token per forward otherwise."""
        row = DraftRow(r.state.draft, r.history, min(self.gamma, r.budget))
        if self.config.drafting == "ouroboros":
            pool = self._pool_of(r.state)
            row.phrases_for = lambda key: pool.newest(key, self.config.draft_phrases)
            row.window_shape = (self.config.phrase_len, self.config.lookahead_window)
            row.add_ngrams = pool.insert_many
        return row

    def _record(self, state: RequestState, counts: DraftStats) -> None:
        """Add to the request's and the process-wide counters."""
        state.stats.add(counts)
        self.stats.add(counts)

    def _eos_token_ids(self) -> set[int]:
        return self.drafter.eos_token_ids if self.drafter is not None else set()

    def _draftable(self, req_id: str, history: np.ndarray) -> bool:
        assert self.drafter is not None
        if self.drafter.fits(history):
            return True
        # A token id past the draft's embedding table (the target's vocabulary can be padded larger):
        # no draft-model tokens for this request rather than a crash of the engine.
        if req_id not in self._skipped_out_of_vocab:
            self._skipped_out_of_vocab.add(req_id)
            logger.warning("ouroboros-vllm: request %s holds token ids outside the draft's vocabulary of %d; "
                           "drafting from the pool only", req_id, self.drafter.vocab_size)
        return False

    def _count_accepted(self, state: RequestState, sampled: list[int]) -> None:
        # vLLM returns the accepted draft prefix plus one token of the target's for a verified row.
        if state.proposal.tokens and sampled:
            accepted = min(len(sampled) - 1, len(state.proposal.tokens))
            from_suffix = max(0, accepted - state.proposal.trunk_len)  # the suffix follows the trunk
            self._record(state, DraftStats(accepted_tokens=accepted, suffix_accepted_tokens=from_suffix))

    def _take_batch_req_ids(self, num_rows: int) -> list[str]:
        req_ids, self._batch_req_ids = self._batch_req_ids, None
        if req_ids is None or len(req_ids) != num_rows:
            raise RuntimeError(
                "OuroborosProposer.propose() was called without the request ids of its batch rows: the "
                "ouroboros-vllm runner hooks are not installed in this process (is the plugin disabled by "
                f"VLLM_PLUGINS?), or this vLLM calls propose() differently (rows: {num_rows}, ids: {req_ids})"
            )
        return req_ids

