"""Adaptive speculation: each step's plan from what the engine measured, and what the plans did.

:class:`AdaptiveController` owns the cost model (:mod:`.cost_model`), the process-wide acceptance rates (the prior
of every request, :mod:`.acceptance`) and how the draft has been drafting, and turns them into each step's
:class:`~ouroboros_vllm.algorithm.planner.StepPlan`. It also keeps what a person needs to trust it: how many
tokens the rows proposed (a histogram), the current fit, the predicted against the measured step time and
accepted tokens, and the calibrations the plans take from those (:class:`~.cost_model.Calibration`).

Six things keep the model honest:

- until both costs have been measured, a step speculates fully (as the fixed modes do), which measures them;
- the target's cost per token can only be learned from steps of different sizes: while the recent steps are
  all alike, one step in :data:`PROBE_EVERY` takes the opposite extreme of its plan (nothing instead of
  what it planned, or the pool's suffixes, which cost no draft forward, instead of nothing);
- what proposing nothing costs is only measured on steps that propose nothing: a batch size's first planned step,
  and one in :data:`PLAIN_PROBE_EVERY` there, runs plain (at plain decoding's cost, forgoing its speculation);
- a request is only known once the draft has drafted for it: its first proposal drafts a trunk, unless
  the draft's catch-up on it (its prompt, at first) would cost more than drafting could save over the tokens the
  request has left (:func:`~ouroboros_vllm.algorithm.step_plans.catch_up_pays`);
- a plan that stops drafting would never learn that drafting has become worth it again (the draft's cost and
  its acceptance are only measured when it drafts): up to :data:`EXPLORE_SHARE` of the time measured since the
  draft last ran is spent on one step that drafts fully, when that time covers the step's expected extra cost;
- about a batch size where speculative steps took longer than plain decoding would have to emit their tokens,
  whatever the model said, steps run plain but for bursts that measure speculation again (:mod:`.yield_guard`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ouroboros_vllm.algorithm.acceptance import PROFILED, ProcessAcceptance, Rate
from ouroboros_vllm.algorithm.cost_model import Calibration, CostModel, LinearCost, is_plain_step
from ouroboros_vllm.algorithm.planner import DraftShape, RowOutlook, StepPlan, empty_plan, plan_seconds, plan_step
from ouroboros_vllm.algorithm.stats import AdaptiveStats
from ouroboros_vllm.algorithm.step_plans import (
    BatchPrices,
    affordable_rows,
    full_plan,
    pool_plan,
    trial_plan,
    try_new_rows,
)
from ouroboros_vllm.algorithm.yield_guard import YieldGuard

PROBE_EVERY = 16
# A plain step (nothing proposed) at a batch size's first planned step (trials included), then at least one in this
# many: proposing nothing is the plan every other is weighed against, and it is only measured on steps that propose
# nothing (a server's first steps at 8 rows priced it from its 1-row warm-up at 0.79 s where it took 0.47 s: every
# trial there looked cheaper than it was by as much).
PLAIN_PROBE_EVERY = 64
FIRST_PLAIN_PROBE = 1
# The plans' calibrations: accepted draft tokens and a speculative step's time (verification and drafting) against
# their predictions, decaying by planned steps, from 1 with the weight of this many tokens or seconds, bounded.
CALIBRATION_DECAY = 0.98
CALIBRATION_PRIOR_TOKENS = 16.0
CALIBRATION_PRIOR_SECONDS = 2.0
CALIBRATION_BOUNDS = (0.5, 1.5)
# Draft forwards measured before the planner may decline a row's catch-up; an engine times as many at start on made-up
# requests (:meth:`.DraftRuntime.calibrate`, after a round that pays one-time costs: this CPU 70-74 ms a forward, then
# 46-53 ms). Before that, a server's first wave of users was tried in full (2.4 s at batch 8, docs/benchmarks.md).
TRUSTED_DRAFT_SAMPLES = 16
EXPLORE_SHARE = 0.02  # at most this share of the time since the draft last ran goes to re-measuring it
SHAPE_DECAY = 0.95  # the draft's shape (tokens per forward, width per row) as decaying averages
PROFILE_SHOWN = 4  # positions of the acceptance profiles the log line shows


class AdaptiveController:
    """The step planner's memory: costs, acceptance priors, the draft's shape, and the last plan's prediction."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.costs = CostModel(min_spread=max(max_tokens // 2, 1))
        self.acceptance = ProcessAcceptance()
        self.stats = AdaptiveStats()
        self._tokens_per_forward = Rate()  # accepted = tokens the deepest row drafted, examined = forwards
        self._width = Rate()  # accepted = tokens carried per row, examined = row-forwards
        # accepted = seconds, examined = tokens of the forwards that were mostly catch-ups: a prompt's tokens cost
        # more than the draft fit's slope says (its context is long; at batch 8, 2.3 ms a token against 1.4)
        self._catch_up = Rate()
        self._since_probe = 0
        self._since_plain: dict[int, int] = {}  # planned steps at a batch size since a plain step there
        self._pending_prediction: float | None = None
        self._pending_accepted: tuple[float, float] | None = None  # the last plan's (trunk, pool), uncalibrated
        self._calibration = Calibration(CALIBRATION_PRIOR_TOKENS, CALIBRATION_DECAY, CALIBRATION_BOUNDS)
        self._pool_calibration = Calibration(CALIBRATION_PRIOR_TOKENS, CALIBRATION_DECAY, CALIBRATION_BOUNDS)
        self._time_calibration = Calibration(CALIBRATION_PRIOR_SECONDS, CALIBRATION_DECAY, CALIBRATION_BOUNDS)
        self._pending_speculative: float | None = None  # the last plan's uncalibrated time, if it proposed
        self._pending_draft_seconds = 0.0
        self._explore_credit = 0.0  # seconds of exploration earned since the draft last ran
        self._rows = 0  # rows of the last plan
        self._proposed = 0  # tokens it proposed
        self.guard = YieldGuard()
        self._last_step: tuple[int, float, bool] | None = None  # (rows, seconds, speculative) of a decoding step
        self._assumed: tuple[LinearCost | None, LinearCost | None] = (None, None)  # its target and plain step

    # ---- what was measured ----------------------------------------------------------------------------

    def observe_target_step(self, tokens: int, seconds: float, rows: int | None = None) -> None:
        """The target's step of ``rows`` rows (default: the last plan's) computed ``tokens`` tokens in ``seconds``."""
        rows = self._rows if rows is None else rows
        self.costs.add_target_step(rows, tokens, seconds)
        # What the guard judges: steps of the plan's rows (some may have finished) with no prompt chunk beside them.
        decoding = rows <= self._rows and tokens <= rows + self._proposed
        speculative = self._proposed > 0 or self._pending_draft_seconds > 0
        self._last_step = (self._rows, seconds + self._pending_draft_seconds, speculative) if decoding else None
        if is_plain_step(rows, tokens):
            self._since_plain[rows] = 0
        self._explore_credit += EXPLORE_SHARE * (seconds + self._pending_draft_seconds)
        if self._pending_prediction is not None:
            self.stats.predicted_seconds += self._pending_prediction
            self.stats.measured_seconds += seconds + self._pending_draft_seconds
            self._pending_prediction = None
        if self._pending_speculative is not None:
            self._time_calibration.add(seconds + self._pending_draft_seconds, self._pending_speculative)
            self._pending_speculative = None

    def observe_emitted(self, tokens: int) -> None:
        """The last step's rows that are still decoding emitted ``tokens`` tokens (accepted drafts and their own)."""
        last, self._last_step = self._last_step, None
        plain = self.costs.plain_at(last[0]) if last is not None else None  # measured at that size, not extrapolated
        if last is not None and plain:  # seconds against what plain decoding takes for those tokens
            self.guard.observe(last[0], last[2], last[1], tokens * plain / last[0])

    def observe_accepted(self, accepted: int, from_pool: int = 0) -> None:
        """The target accepted ``accepted`` draft tokens of the last plan's rows (``from_pool`` the pool's)."""
        if self._pending_accepted is not None:
            trunk, pool = self._pending_accepted
            self.stats.predicted_accepted += trunk * self.acceptance_scale() + pool * self.pool_scale()
            self.stats.verified_accepted += accepted
            self._calibration.add(accepted - from_pool, trunk)
            self._pool_calibration.add(from_pool, pool)
            self._pending_accepted = None

    def acceptance_scale(self) -> float:
        """What the target accepted of the draft model's tokens over what the acceptance model expected, lately: the
        plans' expectations of them are multiplied by it (rows whose estimate is high get the long proposals, so the
        estimates err high where they are used: 10-20% more expected than accepted at batch 8, about a plan's whole
        margin there)."""
        return self._calibration.scale()

    def pool_scale(self) -> float:
        """The same for the pool's tokens: the sources err apart, and one scale let the pool's errors price the trunk
        (docs/design.md, "Calibration")."""
        return self._pool_calibration.scale()

    def time_scale(self) -> float:
        """A speculative step's measured time over the plans' prediction, lately: the target's and the draft's prices
        are multiplied by it (at batch 8 on a CPU they ran 5-7% short in some runs, a plan's whole margin there)."""
        return self._time_calibration.scale()

    def observe_draft(self, forwards: Sequence[tuple[int, int, float]], depth: int | None) -> None:
        """The step's draft forwards, each (rows, tokens carried, seconds), which drafted ``depth`` tokens for the
        deepest row (phrase drafting can emit several tokens a forward); ``depth`` None: forwards of made-up
        requests timed at engine start (:meth:`.DraftRuntime.calibrate`), which teach the draft's prices only."""
        for i, (rows, tokens, seconds) in enumerate(forwards):
            self.costs.draft.add(tokens, seconds)
            # A step's first forward also reads what the rows' caches lack (the prompt, the tokens accepted while a
            # row did not draft): the width a plan pays per forward is the later forwards'.
            if depth is not None and i > 0:
                self._width.add(tokens, rows, SHAPE_DECAY)
            elif tokens > rows * (self.max_tokens + 2):
                self._catch_up.add(seconds, tokens, SHAPE_DECAY)
        if forwards and depth is not None:
            self._pending_draft_seconds += sum(seconds for _, _, seconds in forwards)
            self._explore_credit = 0.0
            self._tokens_per_forward.add(depth, len(forwards), SHAPE_DECAY)

    # ---- the plan ---------------------------------------------------------------------------------------

    def plan(self, rows: Sequence[RowOutlook], max_depth: int, requests: int | None = None) -> StepPlan:
        """This step's plan for ``rows`` (the rows that may propose), trunks at most ``max_depth`` deep;
        ``requests``: the requests the engine holds (those in prefill too), when known."""
        self._pending_draft_seconds = 0.0
        self._pending_prediction = self._pending_accepted = self._pending_speculative = None
        for calibration in (self._calibration, self._pool_calibration, self._time_calibration):
            calibration.age()
        self._rows = len(rows)
        target, draft = self.costs.target_fit(len(rows)), self.costs.draft.fit
        plain = self.costs.plain_cost(len(rows))
        self._assumed = (target, plain)
        if target is None or draft is None:
            plan = full = trials = full_plan(rows, max_depth)  # measures both costs
        else:
            shape, time_scale = self.shape(), self.time_scale()
            scales = {"acceptance_scale": self.acceptance_scale(), "pool_scale": self.pool_scale()}
            target, draft = target.scaled(time_scale), draft.scaled(time_scale)
            plan = plan_step(rows, target, draft, max_depth, shape=shape, plain=plain, **scales)
            # Exploration may draft for every row: its price (catch-ups included) comes out of its own share.
            all_rows, explore, planned = rows, full_plan(rows, max_depth), plan.expected_seconds
            # A draft fit from a few forwards (the first ones, slow with one-time costs) would decline every
            # catch-up and never be corrected, since a declined row runs no forward: rows are tried until then.
            trusted = len(self.costs.draft) >= TRUSTED_DRAFT_SAMPLES
            later = self._prices_at(requests, len(rows), time_scale)
            price = self.catch_up_price(draft.slope)
            plain_yield = len(rows) / (plain or target)(len(rows))
            args = (rows, plan, target, draft, max_depth, shape, later, price, plain_yield)
            affordable = affordable_rows(*args) if trusted else rows
            if affordable is not rows:
                declined = sum(a.can_draft < r.can_draft for a, r in zip(affordable, rows, strict=True))
                self.stats.catch_ups_declined += declined
                rows = affordable
                plan = plan_step(rows, target, draft, max_depth, shape=shape, plain=plain, **scales)
            full = explore if rows is all_rows else full_plan(rows, max_depth)
            trials = trial_plan(rows, plan, target, draft, max_depth, shape, plain_yield) if trusted else full
            self._pending_prediction = plan.expected_seconds
            self._since_probe += 1
            since_plain = self._since_plain.get(len(rows), PLAIN_PROBE_EVERY - FIRST_PLAIN_PROBE) + 1
            self._since_plain[len(rows)] = since_plain
            proposes = any(row.total for row in plan.rows)
            may_explore = plan.depth == 0 and explore.depth > 0
            extra = plan_seconds(all_rows, explore, target, draft, shape, price) - planned if may_explore else 0.0
            if may_explore and self._explore_credit >= extra:
                self._explore_credit -= extra
                self.stats.explore_steps += 1
                self._pending_prediction = None
                plan = explore
            elif since_plain >= PLAIN_PROBE_EVERY and (proposes or trials.depth):
                self._since_probe = 0
                self.stats.probe_steps += 1
                self._pending_prediction = None
                plan = trials = empty_plan(rows)
            elif self._since_probe >= PROBE_EVERY and self._steps_look_alike():
                self._since_probe = 0
                self.stats.probe_steps += 1
                self._pending_prediction = None
                plan = empty_plan(rows) if proposes else pool_plan(rows, full)
        tried = try_new_rows(rows, plan, trials)
        if tried is not plan:
            self._pending_prediction = None
            plan = tried
        # Measured slower than plain at this size, whatever the model said: plain, but for the guard's bursts.
        measured = target is not None and draft is not None
        if measured and any(r.total for r in plan.rows) and not self.guard.allows(len(rows)):
            self.stats.guard_plain_steps += 1
            self._pending_prediction = None
            plan = empty_plan(rows)
        if self._pending_prediction is not None:
            trunk = plan.expected_tokens - len(rows) - plan.expected_pool
            self._pending_accepted = (trunk / self.acceptance_scale(), plan.expected_pool / self.pool_scale())
            # A step whose draft catches a row up (a cost the plans leave out) would mislead the time calibration.
            catch_ups = any(p.trunk and r.catch_up > max_depth + 1 for r, p in zip(rows, plan.rows, strict=True))
            if any(row.total for row in plan.rows) and not catch_ups:
                self._pending_speculative = plan.expected_seconds / self.time_scale()
        self.stats.planned_steps += 1
        self.stats.count_lengths(plan.rows)
        self._proposed = sum(row.total for row in plan.rows)
        return plan

    def target_fit(self) -> LinearCost | None:
        """The target's step time the last plan assumed (the fit at its batch size, see :class:`CostModel`)."""
        return self._assumed[0]

    def plain_cost(self) -> LinearCost | None:
        """A plain step's time the last plan assumed (see :meth:`CostModel.plain_cost`)."""
        return self._assumed[1]

    def catch_up_price(self, slope: float) -> float:
        """Seconds a catch-up token costs the draft: as measured on forwards that were mostly catch-ups, at least
        ``slope`` (the draft fit's, which is all there is before such a forward was measured)."""
        measured = self._catch_up.accepted / self._catch_up.examined if self._catch_up.examined else 0.0
        return max(measured, slope)

    def _prices_at(self, requests: int | None, rows: int, time_scale: float) -> BatchPrices | None:
        """The prices at ``requests`` rows when the engine holds more than the step's rows (target time-scaled)."""
        if requests is None or requests <= rows:
            return None
        target = self.costs.target_fit(requests)
        plain = self.costs.plain_cost(requests) or target
        if target is None or plain is None:
            return None
        return BatchPrices(target.scaled(time_scale), requests / plain(requests))

    def shape(self) -> DraftShape:
        return DraftShape(
            tokens_per_forward=max(self._tokens_per_forward.rate(1.0, prior_trials=1.0), 1.0),
            width_per_row=max(self._width.rate(1.0, prior_trials=1.0), 1.0),
        )

    def _steps_look_alike(self) -> bool:
        """Whether the recent target steps are too alike in size to tell what a token costs."""
        at_size = self.costs.target_by_rows.get(self._rows)
        return at_size is None or at_size.spread < self.costs.min_spread

    def summary(self) -> str:
        s = self.stats
        ratio = ""
        if s.measured_seconds:
            ratio = f", predicted/measured step time {s.predicted_seconds / s.measured_seconds:.2f}"
        if s.predicted_accepted:
            ratio += f", predicted/verified accepted tokens {s.predicted_accepted / max(s.verified_accepted, 1):.2f}"
        declined = f", draft catch-ups declined {s.catch_ups_declined}" if s.catch_ups_declined else ""
        declined += self.guard.summary(self._rows)
        profiles = " ".join(
            f"{source} {','.join(f'{x:+.2f}' for x in self.acceptance.offsets(source)[:PROFILE_SHOWN])}"
            for source in PROFILED
        )
        return (
            f"proposed lengths {s.histogram() or '-'}{declined}; {self.costs.summary()}{ratio}; "
            f"acceptance log-odds by position: {profiles}"
        )
