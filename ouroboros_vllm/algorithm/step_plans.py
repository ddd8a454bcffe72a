"""The plans a step may run instead of the planner's best one, and the rows whose draft catch-up is declined.

The :class:`~ouroboros_vllm.algorithm.adaptive.AdaptiveController` chooses among them: the full plan (what the
fixed modes propose, and what measures the costs), the pool's suffixes alone (a probe of the target's price of a
token that costs no draft forward), the plan with every untried request's trunk drafted, and the rows left to the
draft once the catch-ups that would not pay are declined (:func:`catch_up_pays`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ouroboros_vllm.algorithm.acceptance import conditional_rates
from ouroboros_vllm.algorithm.cost_model import LinearCost
from ouroboros_vllm.algorithm.planner import DraftShape, RowOutlook, RowPlan, StepPlan

# A request the draft has not drafted for yet is judged as if it were this draftable (about what code or a
# repeated text reaches): the process-wide rate it would otherwise start from may come from other text, and a
# request that is never tried never shows what it is worth. A catch-up that would not pay even then is declined.
TRY_RATE = 0.8


def full_plan(rows: Sequence[RowOutlook], max_depth: int) -> StepPlan:
    """Speculate as the fixed modes do: the whole trunk where the draft model serves, the rest from the pool."""
    plans = [RowPlan(min(max_depth, row.budget) if row.can_draft else 0, row.budget) for row in rows]
    depth = max((p.trunk for p in plans), default=0)
    return StepPlan(plans, depth=depth, forwards=depth, expected_tokens=0.0, expected_seconds=0.0)


@dataclass(frozen=True)
class BatchPrices:
    """What a step costs at some batch size: the target's step, and plain decoding's yield (tokens/s)."""

    target: LinearCost
    plain_yield: float


def affordable_rows(
    rows: Sequence[RowOutlook],
    plan: StepPlan,
    target: LinearCost,
    draft: LinearCost,
    max_depth: int,
    shape: DraftShape,
    later: BatchPrices | None = None,
    catch_up_price: float | None = None,
    plain_yield: float | None = None,
) -> Sequence[RowOutlook]:
    """``rows``, with the draft model taken from each row whose catch-up does not pay (``rows`` itself when every
    one's does), priced at ``plain_yield`` (the rows' tokens per second without speculation; None: ``plan``'s
    yield) with the rows that will draft sharing the draft's forwards: those ``plan`` drafts whose catch-ups pay
    (or who need none), found by dropping the rows that do not pay and judging the rest again. Every row of
    ``plan`` counted as a sharer, a row behind by a few dozen tokens looked paid at batch 8 while the rows it would
    share with were declined: such catch-ups bought 2.5 accepted tokens each (policy replay of the batch-8
    benchmark, docs/benchmarks.md).

    A second spent on a catch-up, or on drafting for the row, is worth what the step would emit in it without
    that drafting: at batch 1, the row's own plain decoding. ``plan``'s yield counts the drafting the catch-up is
    for, and at batch 1 it is twice plain's or more: priced at it, the catch-up of a 700-token prompt with 63
    tokens to go looked unpaid (16 tokens gained against 20 spent), where it saves 6.4 s for 1.6 s, and every
    summarization and RAG request at batch 1 went without the draft model (1.04x against the plain draft-model
    mode's 1.25x on RAG). At batch 8 the two yields are within 10% of each other.

    ``later``: the prices at the batch these requests will decode in, when it is larger than the step's (requests
    still in prefill): the catch-up is paid back there, if ever, and a second spent on it is worth that batch's
    yield. Priced at the one or two rows that decode first while the others' prompts are read, a long prompt's
    catch-up looks cheap (MBPP at batch 8, prompts of 673-896 tokens: the draft spent 20.7 s, mostly reading
    prompts, where plain decoding took 58 s in all). The draft's forwards are still shared by the rows drafting
    now: counting the later batch's rows as sharers made a lone catch-up look cheap again (MT-Bench at batch 8:
    0.97x -> 0.82x, the draft catching up requests it had declined). ``catch_up_price``: seconds a catch-up token
    costs, as measured (see :func:`catch_up_pays`)."""
    ratio = plan.expected_tokens / plan.expected_seconds if plain_yield is None else plain_yield
    if later is not None:
        target, ratio = later.target, max(ratio, later.plain_yield)
    # The rows that would share the draft's forwards: those the plan drafts whose catch-up pays (or who need none),
    # found by dropping the ones that do not pay and judging the rest again with fewer to share with; when the plan
    # drafts for no row, the untried rows, tried together (:func:`together`).
    drafting = together(rows, plan)
    while True:
        sharers = [len(drafting) + (i not in drafting) for i in range(len(rows))]
        pays = [
            catch_up_pays(row, ratio, n, target, draft, max_depth, shape, catch_up_price)
            for row, n in zip(rows, sharers, strict=True)
        ]
        unpaid = {i for i in drafting if not pays[i]}
        if not unpaid:
            break
        drafting -= unpaid
    if all(pays):
        return rows
    return [row if ok else replace(row, can_draft=False) for row, ok in zip(rows, pays, strict=True)]


def catch_up_pays(
    row: RowOutlook,
    ratio: float,
    sharers: int,
    target: LinearCost,
    draft: LinearCost,
    max_depth: int,
    shape: DraftShape | None = None,
    per_token: float | None = None,
) -> bool:
    """Whether the draft's catch-up for ``row`` is worth paying: what drafting for the row gains over the steps the
    request has left (:func:`best_trunk`'s gain a step), against the catch-up's time (``per_token`` seconds a token,
    as measured on catch-ups; the draft fit's slope when None), both priced at the step's yield ``ratio``.
    At a large batch a request with a long prompt and a short answer is not worth starting: the draft would
    spend on its prompt more than its drafts could ever save.
    Up to ``max_depth + 1`` tokens are no catch-up: a row that drafted last step lacks what the target accepted
    and its own token, and its next round feeds them as any round does (judged as a catch-up, a request whose
    answer was expected to end soon lost its draft model for good, the tokens it lacked growing every step).
    """
    if not row.can_draft or row.catch_up <= max_depth + 1 or row.remaining is None:
        return True
    _, value, gain = best_trunk(row, ratio, sharers, target, draft, max_depth, shape)
    steps_left = row.remaining / (1.0 + gain)
    return value * steps_left > ratio * (per_token or draft.slope) * row.catch_up


def best_trunk(
    row: RowOutlook,
    ratio: float,
    sharers: int,
    target: LinearCost,
    draft: LinearCost,
    max_depth: int,
    shape: DraftShape | None = None,
) -> tuple[int, float, float]:
    """The trunk depth ``d`` whose value a step is greatest: its expected accepted tokens (an untried row's at
    :data:`TRY_RATE` at least) less ``ratio`` (tokens per second) times what it costs, its verification and its
    part of the draft's forwards (their fixed cost split among ``sharers``, the rows that would draft together).
    ``(depth, value, expected accepted tokens)``; ``(0, 0.0, 0.0)`` when no depth has a positive value."""
    deepest = min(max_depth, row.budget)
    conditional = conditional_rates(np.array([row.trunk_rate]), row.trunk_offsets, deepest)[0]
    if row.untried:
        conditional = np.maximum(conditional, TRY_RATE)
    gains = np.cumsum(np.cumprod(conditional))  # expected accepted tokens of a trunk of 1..deepest tokens
    shape = shape or DraftShape()
    per_forward = draft.intercept / max(sharers, 1) + draft.slope * shape.width_per_row
    best = (0, 0.0, 0.0)
    for depth in range(1, deepest + 1):
        gain = float(gains[depth - 1])
        forwards = math.ceil(depth / max(shape.tokens_per_forward, 1.0))
        value = gain - ratio * (depth * target.slope + forwards * per_forward)
        if value > best[1]:
            best = (depth, value, gain)
    return best


def trial_plan(
    rows: Sequence[RowOutlook],
    plan: StepPlan,
    target: LinearCost,
    draft: LinearCost,
    max_depth: int,
    shape: DraftShape,
    ratio: float,
) -> StepPlan:
    """What each row drafts if it is tried now (:func:`try_new_rows`): the trunk that pays most at :data:`TRY_RATE`
    at these prices (on a 2-core CPU the whole trunk at batch 1; at batch 8, where a verified token costs half
    of what a plain step emits a token in, one or two tokens: a full trunk of 8 there cost about 0.5 s for 4
    tokens, once for every new request), beside the rest of the row's own plan. Rows that are no trial keep
    their plan (it runs every planned step: only the new rows are priced)."""
    drafting = together(rows, plan)
    plans = list(plan.rows)
    for i, row in enumerate(rows):
        if row.untried and row.can_draft:
            depth = best_trunk(row, ratio, len(drafting) + (i not in drafting), target, draft, max_depth, shape)[0]
            plans[i] = RowPlan(depth, max(depth, plan.rows[i].total))
    depth = max((p.trunk for p in plans), default=0)
    return StepPlan(plans, depth=depth, forwards=depth, expected_tokens=0.0, expected_seconds=0.0)


def together(rows: Sequence[RowOutlook], plan: StepPlan) -> set[int]:
    """The rows whose drafting would share the draft's forwards: those ``plan`` drafts for; when it drafts for none,
    every untried row the draft can serve. Judged alone behind a low prior (a poor warm-up), new requests at batch
    8 each paid a whole forward's fixed cost: no catch-up paid, none was tried and the prior never rose (HumanEval
    at batch 8: nothing drafted, 0.92x, where a run that escaped it drafted and ran 1.02x). Only then: tried
    together while other rows drafted too, a server's waves of new requests caught up every prompt (0.97x at 8
    concurrent requests against 1.13x in the sixteenth session's runs; reverted)."""
    drafting = {i for i, planned in enumerate(plan.rows) if planned.trunk}
    return drafting or {i for i, row in enumerate(rows) if row.untried and row.can_draft}


def try_new_rows(rows: Sequence[RowOutlook], plan: StepPlan, full: StepPlan) -> StepPlan:
    """The plan with every untried row drafting its trunk of ``full`` (its full trunk, or :func:`trial_plan`'s): a
    request's own acceptance is only learned by drafting for it, and the process-wide rate it starts from may come
    from very different text."""
    untried = [i for i, row in enumerate(rows) if row.untried and full.rows[i].trunk > plan.rows[i].trunk]
    if not untried:
        return plan
    plans = list(plan.rows)
    for i in untried:
        plans[i] = full.rows[i]
    depth = max(plan.depth, *(full.rows[i].trunk for i in untried))
    return StepPlan(plans, depth=depth, forwards=depth, expected_tokens=0.0, expected_seconds=0.0)


def pool_plan(rows: Sequence[RowOutlook], full: StepPlan) -> StepPlan:
    """The pool's suffixes at every row's budget, no draft forward; the full plan where no row has a pool."""
    if not any(row.pool_hit > 0 for row in rows):
        return full
    plans = [RowPlan(0, row.budget) for row in rows]
    return StepPlan(plans, depth=0, forwards=0, expected_tokens=0.0, expected_seconds=0.0)
