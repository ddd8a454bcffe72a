"""OuroborosProposer: vLLM's ``custom_class`` proposer contract, one loop over the batch rows.

vLLM builds one instance per worker process (``cls(vllm_config)``), calls ``load_model(target_model)`` once
and then ``propose(...)`` once per engine step for the whole batch, after the target verified the previous
step's drafts. The runner hooks (:mod:`.hooks`) tell us, around that call, which request each row holds, what
the target predicted at every verified position and which requests finished.

One step, top to bottom: each row's request state takes the verification (:meth:`on_verified`), then in
:meth:`propose` starts a round; the draft runtime runs every round's forwards, the rounds sharing each forward;
each request's round is lengthened from the pool into the proposal vLLM verifies next.
"""

from __future__ import annotations

import time
from collections.abc import Set
from typing import Any

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger

from ouroboros_vllm.algorithm.adaptive import AdaptiveController
from ouroboros_vllm.algorithm.drafting import DraftRound
from ouroboros_vllm.algorithm.lengths import OutputLengths
from ouroboros_vllm.algorithm.phrase_choice import PhraseJudge, PhraseYield
from ouroboros_vllm.algorithm.planner import RowPlan
from ouroboros_vllm.algorithm.pool_file import PoolFile, PoolIdentity, tokenizer_fingerprint
from ouroboros_vllm.algorithm.request import DraftModelInfo, RequestState
from ouroboros_vllm.algorithm.stats import DraftStats, StatsLogger
from ouroboros_vllm.algorithm.step_plans import full_plan
from ouroboros_vllm.algorithm.tree import DraftTree
from ouroboros_vllm.algorithm.tree_choice import trees_pay
from ouroboros_vllm.runtime.draft_runtime import DraftRuntime
from ouroboros_vllm.runtime.loading import resolve_model_path, resolve_precision, tokenizer_vocab
from ouroboros_vllm.vllm_plugin import hooks, tree_scorer
from ouroboros_vllm.vllm_plugin.config import OuroborosConfig, wants_own_pool
from ouroboros_vllm.vllm_plugin.metrics import MetricsExporter

logger = init_logger(__name__)


class OuroborosProposer(hooks.StepListener):
    """Drafts for each running request and lengthens the draft from the shared phrase pool.

    ``propose`` returns at most K (``num_speculative_tokens``) ids per row: up to gamma tokens from the draft
    model (the trunk), then pool phrases. One pool per process serves every request (warm start)."""

    def __init__(self, vllm_config: VllmConfig) -> None:
        # Also done by the plugin entry point; repeated here so that an allow-list (VLLM_PLUGINS) that leaves the
        # plugin out cannot leave the proposer without its hooks, and so that an unsupported vLLM fails here.
        hooks.install()
        spec_config = vllm_config.speculative_config
        assert spec_config is not None and spec_config.num_speculative_tokens is not None
        self.config = OuroborosConfig.from_additional_config(vllm_config.additional_config)
        self.num_speculative_tokens = int(spec_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.target_tokenizer = vllm_config.model_config.tokenizer
        self.target_dtype = vllm_config.model_config.dtype
        self.config.check_against(self.num_speculative_tokens)
        self.trees = self.config.verification != "chain" and tree_scorer.engine_takes_trees(vllm_config)
        self.settings = self.config.draft_settings(self.num_speculative_tokens, trees=self.trees)
        self._trees: dict[str, DraftTree] = {}  # the trees of the proposals just made, for the runner hooks
        # A missing draft folder fails here, at engine start, rather than at load_model.
        draft_model = self.config.draft_model if self.config.uses_draft_model else None  # the config requires one
        self.draft_path = None if draft_model is None else resolve_model_path(draft_model)

        self.pool = self.config.new_pool()  # the shared pool (warm start)
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
        self.drafter: DraftRuntime | None = None
        self.requests: dict[str, RequestState] = {}
        self.stats = DraftStats()
        self._stats_logger = StatsLogger(self.config.stats_log_interval_s, logger)
        model_config = vllm_config.model_config
        self._metrics = MetricsExporter(str(getattr(model_config, "served_model_name", None) or model_config.model))
        # Token ids a target step can hold: when the draft's vocabulary covers them, no row needs checking.
        self._target_vocab_size = int(model_config.get_vocab_size())
        self.controller = AdaptiveController(self.num_speculative_tokens)
        self.phrases = PhraseYield()  # what drafting phrase by phrase yields, over every request: their prior
        self.lengths = OutputLengths()  # what finished requests emitted: what running ones may still emit
        self._step: tuple[int, int, float] | None = None  # (tokens, requests, start) of the step under way
        self._batch_req_ids: list[str] | None = None
        self._skipped_out_of_vocab: set[str] = set()

    def summary(self) -> str:
        """The process-wide stats in one line (logged every ``stats_log_interval_s``, printed by the demo)."""
        parts = [self.stats.summary()] + ([self.pool.summary()] if self.config.uses_pool else [])
        parts += [self.controller.summary()] if self.config.adaptive else []
        return "; ".join(parts)

    def load_model(self, target_model: torch.nn.Module) -> None:
        if self.draft_path is None:  # pool_only: no draft model
            return
        device = next(target_model.parameters()).device
        precision = resolve_precision(self.config.draft_dtype, self.target_dtype, device)
        static_shapes = self.config.static_draft_forward(device.type)
        self.drafter = DraftRuntime.load(self.draft_path, target_tokenizer=self.target_tokenizer, device=device,
                                         precision=precision, static_shapes=static_shapes)  # fmt: skip
        if self.config.adaptive:  # the planner prices the draft from the first request on, not by trying it on them
            forwards = self.drafter.calibrate()
            self.controller.observe_draft(forwards, depth=None)
            logger.info("ouroboros-vllm: draft timed: %d forwards, %.2f s", len(forwards), sum(f[-1] for f in forwards))

    # ---- reports from the runner hooks -------------------------------------------------------------------

    def on_step_start(self, num_scheduled_tokens: int, num_requests: int) -> None:
        self._step = (num_scheduled_tokens, num_requests, time.perf_counter())

    def on_requests_finished(self, req_ids: set[str]) -> None:
        for req_id in req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                self.lengths.add(state.output_length)
                logger.debug("ouroboros-vllm: request %s done: %s", req_id, state.stats.summary())
                if self.drafter is not None:
                    self.drafter.release(state.draft)
            self._skipped_out_of_vocab.discard(req_id)
        self._push_metrics()

    def on_requests_added(self, sampling_params: dict[str, Any]) -> None:
        for req_id, params in sampling_params.items():
            if req_id not in self.requests:
                state = self.requests[req_id] = self._new_request(cold=wants_own_pool(req_id, params, logger))
                state.max_tokens = getattr(params, "max_tokens", None)
                state.takes_tree = self.trees and tree_scorer.takes_tree(params)

    def on_batch(self, req_ids: list[str]) -> None:
        self._batch_req_ids = req_ids

    def take_trees(self) -> dict[str, DraftTree]:
        trees, self._trees = self._trees, {}
        return trees

    def on_trees_refused(self) -> None:
        self.trees, self.settings = False, self.config.draft_settings(self.num_speculative_tokens)

    def on_verified(self, req_ids: list[str], drafts: list[list[int]], target_argmax: list[list[int]],
                    trees: Set[str] = frozenset()) -> None:  # fmt: skip
        if self._step is not None:
            tokens, requests, start = self._step
            self._step = None
            # Steps with a prompt chunk cost per token what a long prefill costs, not what a draft's verification
            # does: only decoding steps teach the cost model.
            if tokens <= requests * (self.num_speculative_tokens + 1):
                self.controller.observe_target_step(tokens, time.perf_counter() - start, rows=requests)
        for req_id, draft, argmax in zip(req_ids, drafts, target_argmax, strict=True):
            state = self.requests.get(req_id)
            if state is not None:
                self._record(state, state.after_verification(draft, argmax, as_tree=req_id in trees))

    # ---- the custom_class contract -------------------------------------------------------------------------

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,  # vLLM passes the target's KV slots; our draft keeps its own cache
    ) -> list[list[int]]:
        start = time.perf_counter()
        req_ids = self._take_batch_req_ids(len(sampled_token_ids))
        # A row whose request the hooks never announced (should not happen) is drafted for with the defaults.
        states = [self.requests.get(r) or self.requests.setdefault(r, self._new_request(cold=False)) for r in req_ids]
        # (state, history, budget, the draft model if it can serve the row) of every row that may propose.
        rows: list[tuple[RequestState, np.ndarray, int, DraftModelInfo | None]] = []
        planned_accepted = planned_from_pool = 0  # draft tokens accepted of the last plan's rows, and the pool's
        emitted = 0  # tokens the rows that may propose emitted in the last step
        for row, (req_id, state, sampled) in enumerate(zip(req_ids, states, sampled_token_ids, strict=True)):
            num_tokens = int(num_tokens_no_spec[row])
            # Near max_model_len, a draft must leave room for the target's own token.
            budget = min(self.num_speculative_tokens, self.max_model_len - num_tokens - 1)
            counts = state.count_accepted(sampled)
            if not state.cold:
                planned_accepted += counts.accepted_tokens
                planned_from_pool += counts.suffix_accepted_tokens
            self._record(state, counts)
            # Rows still in (chunked) prefill sampled nothing: there is no next token to draft after yet.
            if sampled and budget > 0:
                emitted += len(sampled)
                history = token_ids_cpu[row, :num_tokens]
                rows.append((state, history, budget, self._draft_model_for(req_id, history)))
        self.controller.observe_emitted(emitted)
        self.controller.observe_accepted(planned_accepted, planned_from_pool)  # a no-op unless the last plan predicted
        trees = self.trees and (self.config.verification == "tree" or trees_pay(self.controller, len(rows)))
        for state, *_ in rows:
            state.tree = trees and state.takes_tree
        plans = self._plan(rows)
        # Planned rounds carry the pool's phrases where they pay at the draft's measured price of a forward.
        price = self.controller.costs.draft.fit if self.config.judges_phrases else None
        sharers = sum(1 for row_plan in plans if row_plan.trunk)
        proposing = [
            (state, history, row_plan, state.start_round(
                history, row_plan.trunk, info, row_plan.total, None if state.cold else price, sharers
            ))
            for (state, history, _, info), row_plan in zip(rows, plans, strict=True)
            if row_plan.total
        ]  # fmt: skip
        forwards = self._run_draft_model([(state, round_) for state, _, _, round_ in proposing if round_])
        seconds = time.perf_counter() - start
        for state, history, row_plan, round_ in proposing:
            _, counts = state.finish_round(round_, history, row_plan.total, trunk=row_plan.trunk)
            counts.draft_seconds = seconds / len(proposing)  # the step's drafting, shared evenly
            self._record(state, counts)
        if forwards:
            self.controller.observe_draft(forwards, max(len(r.drafted) for _, _, _, r in proposing if r))
        self.stats.steps += bool(proposing)
        self._stats_logger.maybe_log(self.summary)
        if self._metrics.due():
            self._push_metrics()
        if self.pool_file is not None:
            self.pool_file.maybe_save(self.pool)
        self._trees = {req: s.proposal.tree() for req, s in zip(req_ids, states, strict=True) if s.proposal.parents}
        return [state.proposal.tokens for state in states]

    def _plan(self, rows: list[tuple[RequestState, np.ndarray, int, DraftModelInfo | None]]) -> list[RowPlan]:
        """How many tokens each row proposes and how many of them the draft model drafts. Cold requests (seeded
        sampling among them) get fixed lengths: vLLM's rejection sampler draws a random number per proposed
        token, so a seeded output must not depend on a plan made from timings and other requests' acceptance."""
        histories, cached = [row[1] for row in rows], [len(row[0].draft.ids) for row in rows]
        # What the draft's cache lacks per row: prompt prefixes that rows hold or share are not read by each.
        catch_ups = self.drafter.catch_ups(histories, cached) if self.drafter else [0.0 for _ in rows]
        outlooks = [
            state.outlook(budget, info is not None, catch_up, self.lengths, self.config.uses_pool)
            for (state, _, budget, info), catch_up in zip(rows, catch_ups, strict=True)
        ]
        plans = full_plan(outlooks, self.config.fixed_gamma_for(self.num_speculative_tokens)).rows
        planned = [i for i, (state, _, _, _) in enumerate(rows) if self.config.adaptive and not state.cold]
        if planned:
            step = self.controller.plan([outlooks[i] for i in planned], self.settings.gamma, len(self.requests))
            for i, row_plan in zip(planned, step.rows, strict=True):
                plans[i] = row_plan
        return plans

    def _run_draft_model(self, rounds: list[tuple[RequestState, DraftRound]]) -> list[tuple[int, int, float]]:
        """Every request's trunk in shared draft forwards; each forward's (rows, tokens, seconds). Cold requests
        draft alone and reproducibly: with int8 weights a forward's numbers depend on every row in it and on how
        its lm_head call is split, and a cold (e.g. seeded) request's drafts must not depend on other traffic or
        on timings."""
        if self.drafter is None:
            return []
        shared, cold = [r for s, r in rounds if not s.cold], [r for s, r in rounds if s.cold]
        groups = [shared] if self.config.batch_draft else [[round_] for round_ in shared]
        timings = [timing for group in groups if group for timing in self.drafter.draft(group)]
        return timings + [timing for r in cold for timing in self.drafter.draft([r], reproducible=True)]

    # ---- requests --------------------------------------------------------------------------------------------

    def _new_request(self, cold: bool) -> RequestState:
        own_pool = cold or not self.config.warm_start
        pool = self.config.new_pool() if own_pool else self.pool
        phrases = PhraseJudge(process=self.phrases)
        return RequestState(self.settings, pool, cold=cold, prior=self.controller.acceptance, phrases=phrases)

    def _draft_model_for(self, req_id: str, history: np.ndarray) -> DraftModelInfo | None:
        """The draft model's description for this request, or None when the draft model cannot serve it."""
        if self.drafter is None:
            return None
        info = self.drafter.info
        if self._target_vocab_size <= info.vocab_size or history.size == 0 or int(history.max()) < info.vocab_size:
            return info
        # A token id past the draft's embedding table (the target's vocabulary can be padded larger):
        # no draft-model tokens for this request rather than a crash of the engine.
        if req_id not in self._skipped_out_of_vocab:
            self._skipped_out_of_vocab.add(req_id)
            message = "ouroboros-vllm: request %s holds token ids outside the draft's vocabulary of %d; pool only"
            logger.warning(message, req_id, info.vocab_size)
        return None

    # ---- stats -------------------------------------------------------------------------------------------

    def _record(self, state: RequestState, counts: DraftStats) -> None:
        """Add to the request's and the process-wide counters."""
        state.stats.add(counts)
        self.stats.add(counts)

    def _push_metrics(self) -> None:
        self._metrics.push(self.stats, self.pool if self.config.uses_pool else None, len(self.requests))
        if self.config.adaptive:
            self._metrics.push_adaptive(self.controller)

    def _take_batch_req_ids(self, num_rows: int) -> list[str]:
        req_ids, self._batch_req_ids = self._batch_req_ids, None
        if req_ids is None or len(req_ids) != num_rows:
            raise RuntimeError(
                "OuroborosProposer.propose() was called without its batch rows' request ids: the ouroboros-vllm "
                "runner hooks are not installed in this process (is the plugin disabled by VLLM_PLUGINS?), or "
                f"this vLLM calls propose() differently (rows: {num_rows}, ids: {req_ids})"
            )
        return req_ids
