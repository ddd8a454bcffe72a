"""The plans a step may run instead of the planner's best one, and the rows whose draft catch-up is declined.

The :class:`~ouroboros_vllm.algorithm.adaptive.AdaptiveController` chooses among them: the full plan (what the
fixed modes propose, and what measures the costs), the pool's suffixes alone (a probe of the target's price of a
token that costs no draft forward), the plan with every untried request's trunk drafted, and the rows left to the
draft once the catch-ups that would not pay are declined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ouroboros_vllm.algorithm.cost_model import LinearCost
from ouroboros_vllm.algorithm.planner import DraftShape, RowOutlook, RowPlan, StepPlan, catch_up_pays


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
) -> Sequence[RowOutlook]:
    """``rows``, with the draft model taken from each row whose catch-up does not pay (``rows`` itself when every
    one's does), priced at ``plan``'s yield with the rows it drafts for sharing the draft's forwards.

    ``later``: the prices at the batch these requests will decode in, when it is larger than the step's (requests
    still in prefill): the catch-up is paid back there, if ever, and a second spent on it is worth that batch's
    yield. Priced at the one or two rows that decode first while the others' prompts are read, a long prompt's
    catch-up looks cheap (MBPP at batch 8, prompts of 673-896 tokens: the draft spent 20.7 s, mostly reading
    prompts, where plain decoding took 58 s in all). The draft's forwards are still shared by the rows drafting
    now: counting the later batch's rows as sharers made a lone catch-up look cheap again (MT-Bench at batch 8:
    0.97x -> 0.82x, the draft catching up requests it had declined). ``catch_up_price``: seconds a catch-up token
    costs, as measured (see :func:`catch_up_pays`)."""
    ratio = plan.expected_tokens / plan.expected_seconds
    if later is not None:
        target, ratio = later.target, max(ratio, later.plain_yield)
    drafting = sum(1 for row in plan.rows if row.trunk)
    pays = [
        catch_up_pays(row, ratio, drafting + (not planned.trunk), target, draft, max_depth, shape, catch_up_price)
        for row, planned in zip(rows, plan.rows, strict=True)
    ]
    if all(pays):
        return rows
    return [row if ok else replace(row, can_draft=False) for row, ok in zip(rows, pays, strict=True)]


def try_new_rows(rows: Sequence[RowOutlook], plan: StepPlan, full: StepPlan) -> StepPlan:
    """The plan with every untried row drafting its full trunk: a request's own acceptance is only learned by
    drafting for it, and the process-wide rate it starts from may come from very different text."""
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
