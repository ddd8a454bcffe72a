"""The decision of each step: how many tokens each row proposes, and from where, to emit the most tokens per
second of the whole step (the draft's forwards and the target's verification together).

For every request in the step the planner weighs three kinds of proposal:

- nothing: the row emits its one token, as in plain decoding;
- a pool suffix only: tokens that cost the target's verification and nothing else;
- the draft model's trunk of ``depth`` tokens, optionally followed by a pool suffix: the trunk also costs the
  draft's forwards, which every drafting row shares.

A token is worth the chance that it is emitted (every token before it accepted, and itself), from the request's
acceptance estimates and the process's profile of them by position; it costs the target's per-token step time,
and a trunk its share of the draft's forwards.
The step's yield is (tokens emitted) / (seconds), a ratio of sums: Dinkelbach's method finds the plan that
maximises it by choosing, at the current ratio R, each row's option with the most ``gain - R * cost``, then
updating R, a few times. The shared parts (one depth for every drafting row, the draft's fixed cost per forward)
are searched outright: every depth from 0 to gamma.

A step in which no row proposes anything runs no draft forward: it costs what a plain step costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ouroboros_vllm.algorithm.acceptance import conditional_rates, reach_chances
from ouroboros_vllm.algorithm.cost_model import LinearCost


@dataclass(frozen=True)
class RowOutlook:
    """What the planner knows of one row."""

    budget: int  # most tokens the row may propose
    trunk_rate: float  # chance a trunk token is accepted, given the ones before it
    pool_rate: float  # the same for a pool suffix token
    pool_hit: float  # chance that the pool holds a suffix for the row's key
    can_draft: bool  # the draft model can serve the row
    # Tokens the draft's cache lacks before it can draft for the row (its prompt, or what was accepted while the
    # row did not draft; less a prompt prefix the draft's cache holds, and a share of one that rows catching up
    # together have in common, which is read once). Paid once, then the row drafts from a cache that keeps up:
    # an investment, judged over the request's remaining tokens by
    # :func:`~ouroboros_vllm.algorithm.step_plans.catch_up_pays`; the per-step choice leaves it out.
    catch_up: float = 0
    untried: bool = False  # the draft model has not drafted for the row yet: its trunk rate is the process's guess
    remaining: float | None = None  # tokens the request is expected to still emit (None: not known)
    # Tree verification: alternative branches the pool may offer at the trunk's end (each up to ``branch_len``
    # tokens), and the chance that an alternative's first token is the target's. 0: the row proposes a chain.
    alternatives: int = 0
    branch_len: int = 0
    branch_rate: float = 0.0
    # The rates' profiles by position (log-odds offsets, see acceptance.PositionProfile); () leaves the rate as it
    # is at every position.
    trunk_offsets: tuple[float, ...] = ()
    pool_offsets: tuple[float, ...] = ()


@dataclass(frozen=True)
class DraftShape:
    """How the draft model has been drafting: trunk tokens emitted per forward, tokens each row adds to a forward."""

    tokens_per_forward: float = 1.0
    width_per_row: float = 1.0


@dataclass(frozen=True)
class RowPlan:
    trunk: int  # draft-model tokens (0: the row is not in the draft's forwards)
    total: int  # tokens proposed: the trunk, then a pool suffix


@dataclass(frozen=True)
class StepPlan:
    rows: list[RowPlan]
    depth: int  # draft-model tokens the drafting rows draft
    forwards: int  # draft forwards the plan expects
    expected_tokens: float  # tokens the step is expected to emit
    expected_seconds: float  # the step's expected time, drafting included
    expected_pool: float = 0.0  # of the expected tokens, those from the pool (suffixes and branches) accepted


def plan_step(
    rows: Sequence[RowOutlook],
    target: LinearCost,
    draft: LinearCost,
    max_depth: int,
    *,
    shape: DraftShape = DraftShape(),
    other_tokens: int = 0,
    plain: LinearCost | None = None,
    acceptance_scale: float = 1.0,
    pool_scale: float = 1.0,
) -> StepPlan:
    """The best plan for these rows. ``target`` is the target's step time by tokens computed, measured on steps
    that verified proposals; ``draft`` one draft forward's time by tokens carried; ``plain`` the step time of a
    step that verifies nothing (None: ``target``'s); ``other_tokens`` are the step's tokens that are not these
    rows' (prefill chunks); ``acceptance_scale`` multiplies every expected accepted trunk token and ``pool_scale``
    every pool token (the calibrations of the acceptance model against what the target accepted, per source).

    A plain step is priced apart (a line through speculative steps put it at 368 ms where 230-290 ms was measured,
    at batch 8 on a CPU). A plan must also keep the rows' mean time per token within a plain step's: a step is as
    slow for every row in it (both: docs/design.md, "The decision")."""
    options = _Options(rows, acceptance_scale, pool_scale)
    base_tokens = float(len(rows))
    base_seconds = target(len(rows) + other_tokens)
    plain_seconds = (plain or target)(len(rows) + other_tokens)
    picks = options.picks(max_depth, target.slope, draft, shape, base_tokens, base_seconds)
    best_depth, best_ratio, proposes = None, base_tokens / plain_seconds, picks.proposes
    # The first depth of the best yield, if it beats plain decoding and keeps the rows' mean time per token.
    for depth in range(0, max_depth + 1):
        ratio = picks.tokens[depth] / picks.seconds[depth]
        if proposes[depth] and ratio > best_ratio and picks.time_per_token[depth] <= plain_seconds:
            best_depth, best_ratio = depth, ratio
    if best_depth is None:
        return StepPlan(
            [RowPlan(0, 0) for _ in rows], depth=0, forwards=0, expected_tokens=base_tokens,
            expected_seconds=plain_seconds,
        )  # fmt: skip
    return picks.plan(best_depth)


def empty_plan(rows: Sequence[RowOutlook]) -> StepPlan:
    """Nothing proposed by any row (no prediction: the plan of a probe)."""
    return StepPlan([RowPlan(0, 0) for _ in rows], depth=0, forwards=0, expected_tokens=0.0, expected_seconds=0.0)


def plan_seconds(
    rows: Sequence[RowOutlook],
    plan: StepPlan,
    target: LinearCost,
    draft: LinearCost,
    shape: DraftShape,
    catch_up_price: float | None = None,
) -> float:
    """The expected time of a given plan for ``rows`` (drafting included), by the same model as
    :func:`plan_step`; the drafting rows' catch-ups at ``catch_up_price`` seconds a token (the draft fit's slope
    when None: a prompt's token costs the draft more than that)."""
    seconds = target(len(rows) + sum(row.total for row in plan.rows))
    drafting = sum(1 for row in plan.rows if row.trunk)
    if drafting and plan.depth:
        forwards = math.ceil(plan.depth / max(shape.tokens_per_forward, 1.0))
        seconds += forwards * (draft.intercept + draft.slope * shape.width_per_row * drafting)
        catch_ups = sum(row.catch_up for row, p in zip(rows, plan.rows, strict=True) if p.trunk)
        seconds += (catch_up_price or draft.slope) * catch_ups
    return seconds


def pool_gains(row: RowOutlook, width: int) -> np.ndarray:
    """Expected accepted pool tokens of a suffix of s = 0..width-1 nodes hung at the trunk's end: the s likeliest
    nodes. A chain's j-th token is worth the chance that its first j are accepted (``pool_rate^j`` without a
    profile); with trees, an alternative branch's first token ``branch_rate``, and each later one that times the
    chain's rate at its position (as :func:`~ouroboros_vllm.algorithm.proposal.lengthen_tree` places them)."""
    conditional = conditional_rates(np.array([row.pool_rate]), row.pool_offsets, width - 1)[0]
    values = [np.cumprod(conditional)]
    if row.alternatives and row.branch_len:
        branch = row.branch_rate * np.cumprod(np.concatenate([[1.0], conditional[1:]]))
        values += [branch[: min(row.branch_len, width - 1)]] * row.alternatives
    best = np.sort(np.concatenate(values))[::-1][: width - 1]
    return np.concatenate([[0.0], np.cumsum(best)])


def _reach_chances(rows: Sequence[RowOutlook], rates: np.ndarray, profiled: str, length: int) -> np.ndarray:
    """:func:`~ouroboros_vllm.algorithm.acceptance.reach_chances` of every row, [rows, length + 1], with each
    row's offsets (the attribute ``profiled``): at once where the rows share one profile, as the proposer's do."""
    offsets = [getattr(row, profiled) for row in rows]
    if all(o == offsets[0] for o in offsets):
        return reach_chances(rates, offsets[0] if offsets else (), length)
    return np.concatenate([reach_chances(rates[i : i + 1], o, length) for i, o in enumerate(offsets)])


def _pool_gains(rows: Sequence[RowOutlook], pool_rates: np.ndarray, width: int) -> np.ndarray:
    """:func:`pool_gains` of every row, [rows, width]: the chains' at once (most rows hang no alternatives)."""
    chains = _reach_chances(rows, pool_rates, "pool_offsets", width - 1)[:, 1:]
    gains = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(-np.sort(-chains, axis=1), axis=1)], axis=1)
    for i, row in enumerate(rows):
        if row.alternatives and row.branch_len:
            gains[i] = pool_gains(row, width)
    return gains


class _Options:
    """Every proposal each row could make, as arrays over (row, trunk tokens proposed q, pool suffix tokens s):
    q = 0 is a pool suffix alone (or nothing); q > 0 proposes a prefix of the drafted trunk, then a suffix."""

    def __init__(self, rows: Sequence[RowOutlook], trunk_scale: float = 1.0, pool_scale: float = 1.0) -> None:
        # One pass over the rows into arrays: the planner runs every engine step, and per-field passes add up.
        fields = np.array(
            [(row.budget, row.trunk_rate, row.pool_hit, row.can_draft, row.pool_rate) for row in rows], dtype=np.float64
        ).reshape(len(rows), 5)
        budgets = fields[:, 0].astype(np.int64)
        width = int(budgets.max(initial=0)) + 1
        power = np.arange(width)
        trunk = _reach_chances(rows, fields[:, 1], "trunk_offsets", width - 1)  # [rows, q]: q trunk tokens accepted
        trunk_gain = np.cumsum(trunk, axis=1) - 1  # expected accepted of a q-token trunk: rate + ... + rate^q
        pool_gain = fields[:, 2, None] * _pool_gains(rows, fields[:, 4], width)
        self.pool_gain = pool_scale * trunk[:, :, None] * pool_gain[:, None, :]  # [rows, q, s]
        self.gain = trunk_scale * trunk_gain[:, :, None] + self.pool_gain
        self.tokens = power[:, None] + power[None, :]  # [q, s]
        self.q = np.broadcast_to(power[:, None], self.tokens.shape)
        self.fits = self.tokens[None] <= budgets[:, None, None]
        self.budgets = budgets
        self.can_draft = fields[:, 3].astype(bool)

    def picks(
        self,
        max_depth: int,
        token_seconds: float,
        draft: LinearCost,
        shape: DraftShape,
        base_tokens: float,
        base_seconds: float,
    ) -> _Picks:
        """Each row's best option at every shared depth 0..max_depth, all depths at once (arrays over
        [depth, row, option]): the planner runs every engine step, and a loop over depths cost most of its time."""
        rows = len(self.budgets)
        depths = np.arange(max_depth + 1)
        forwards = np.ceil(depths / max(shape.tokens_per_forward, 1.0))
        trunk = np.where(self.can_draft, np.minimum(depths[:, None], self.budgets), 0)  # [depth, row]: tokens drafted
        valid = self.fits & (self.q <= trunk[:, :, None, None])  # [depth, row, q, s]
        per_row = forwards * draft.slope * shape.width_per_row  # a drafting row's share of the forwards, per depth
        # [depth, option]: the same for every row (fancy indexing below, not a per-row copy: a step's planning
        # is a few dozen array calls, and each one's fixed cost is what it costs).
        cost = (self.tokens * token_seconds + (self.q > 0) * per_row[:, None, None]).reshape(len(depths), -1)
        gain = np.where(valid, self.gain, -np.inf).reshape(len(depths), rows, -1)
        drafts = (self.q > 0).reshape(-1)
        fixed_draft = forwards * draft.intercept
        at_depth, at_row = depths[:, None], np.arange(rows)[None, :]

        def totals(pick: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            seconds = base_seconds + cost[at_depth, pick].sum(axis=1)
            seconds += np.where(drafts[pick].any(axis=1), fixed_draft, 0.0)
            return base_tokens + gain[at_depth, at_row, pick].sum(axis=1), seconds

        # Dinkelbach's iteration at every depth together; a depth that converged keeps its ratio (and its pick).
        ratio = np.full(len(depths), base_tokens / base_seconds)
        for _ in range(16):  # converges in a few steps
            pick = np.argmax(gain - ratio[:, None, None] * cost[:, None, :], axis=2)
            tokens, seconds = totals(pick)
            converged = np.abs(tokens / seconds - ratio) <= 1e-12 * ratio
            if converged.all():
                break
            ratio = np.where(converged, ratio, tokens / seconds)
        # Each row's step time per emitted token, averaged over the rows: a step's mean time per output token.
        emitted = 1.0 + gain[at_depth, at_row, pick]  # [depth, row]
        time_per_token = seconds * (1.0 / emitted).mean(axis=1) if rows else seconds
        pool = self.pool_gain.reshape(rows, -1)[at_row, pick].sum(axis=1)
        return _Picks(self, pick, trunk, forwards, tokens, seconds, time_per_token, pool)


@dataclass(frozen=True)
class _Picks:
    """The options picked at each depth, with each depth's expected tokens and seconds."""

    options: _Options
    pick: np.ndarray  # [depth, row]: the flat (q, s) index each row picked
    trunk: np.ndarray  # [depth, row]: tokens each row would draft
    forwards: np.ndarray  # [depth]
    tokens: np.ndarray  # [depth]
    seconds: np.ndarray  # [depth]
    time_per_token: np.ndarray  # [depth]: the rows' mean of the step's seconds over their expected tokens
    pool: np.ndarray  # [depth]: of the expected tokens, the pool's

    @property
    def proposes(self) -> np.ndarray:
        """[depth]: whether any row proposes a token."""
        return (self.options.tokens.reshape(-1)[self.pick] > 0).any(axis=1)

    def plan(self, depth: int) -> StepPlan:
        q, s = np.unravel_index(self.pick[depth], self.options.tokens.shape)
        drafting = bool((q > 0).any())
        trunk = self.trunk[depth]
        return StepPlan(
            rows=[RowPlan(int(trunk[r]) if q[r] else 0, int(q[r] + s[r])) for r in range(len(q))],
            depth=depth if drafting else 0,
            forwards=int(self.forwards[depth]) if drafting else 0,
            expected_tokens=float(self.tokens[depth]),
            expected_seconds=float(self.seconds[depth]),
            expected_pool=float(self.pool[depth]),
        )
