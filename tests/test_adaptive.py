"""Adaptive speculation, pure parts: the cost model's fit, the acceptance estimates and the step planner."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ouroboros_vllm.algorithm import planner
from ouroboros_vllm.algorithm.acceptance import AcceptanceModel, ProcessAcceptance, expected_accepted
from ouroboros_vllm.algorithm.adaptive import (
    EXPLORE_SHARE,
    FIRST_PLAIN_PROBE,
    PLAIN_PROBE_EVERY,
    PROBE_EVERY,
    TRUSTED_DRAFT_SAMPLES,
    AdaptiveController,
)
from ouroboros_vllm.algorithm.cost_model import CostModel, LinearCost, OnlineLinearFit
from ouroboros_vllm.algorithm.planner import DraftShape, RowOutlook, plan_step
from ouroboros_vllm.algorithm.step_plans import catch_up_pays, together


def row(budget=8, trunk=0.8, pool=0.3, hit=0.5, can_draft=True) -> RowOutlook:
    return RowOutlook(budget=budget, trunk_rate=trunk, pool_rate=pool, pool_hit=hit, can_draft=can_draft)


def outlook_rows(max_size: int) -> st.SearchStrategy[list[RowOutlook]]:
    """Hypothesis: 1..max_size rows of any budget, acceptance, pool hit rate and draftability."""
    outlook = st.builds(
        row,
        budget=st.integers(1, 8),
        trunk=st.floats(0, 1),
        pool=st.floats(0, 1),
        hit=st.floats(0, 1),
        can_draft=st.booleans(),
    )
    return st.lists(outlook, min_size=1, max_size=max_size)


# A CPU like this project's: a plain step 300 ms, 20 ms more per token verified; a draft forward 30 ms.
CPU_TARGET = LinearCost(0.28, 0.020)
CPU_DRAFT = LinearCost(0.030, 0.001)


# ------------------------------------------------------------------------------------------- the cost model


def test_the_fit_recovers_a_line_from_noisy_steps_and_ignores_outliers():
    rng = random.Random(0)
    fit = OnlineLinearFit()
    for _ in range(300):
        tokens = rng.randint(1, 72)
        seconds = 0.3 + 0.012 * tokens + rng.gauss(0, 0.005)
        if rng.random() < 0.03:
            seconds *= 6  # a preemption, a neighbour: far off the line
        fit.add(tokens, seconds)
    assert fit.fit is not None
    assert fit.fit.intercept == pytest.approx(0.3, rel=0.05)
    assert fit.fit.slope == pytest.approx(0.012, rel=0.08)


def test_steps_of_one_size_give_a_sensible_answer_at_that_size():
    fit = OnlineLinearFit()
    for _ in range(40):
        fit.add(9, 0.5)
    assert fit.fit is not None
    assert fit.fit(9) == pytest.approx(0.5, rel=0.01)
    assert 0 < fit.fit.slope < fit.fit.intercept  # the prior's small slope, not nonsense


def test_the_fit_follows_a_change_of_machine_speed():
    fit = OnlineLinearFit(window=64)
    for i in range(200):
        fit.add(1 + i % 20, (0.3 + 0.01 * (1 + i % 20)) * (1 if i < 100 else 3))  # a neighbour arrives at 100
    assert fit.fit is not None and fit.fit(10) == pytest.approx(3 * 0.4, rel=0.05)


# ------------------------------------------------------------------------------------------- acceptance


def test_a_request_learns_its_own_rate_from_a_process_prior():
    prior = ProcessAcceptance()
    for _ in range(50):
        prior.record("trunk", 4, 3)  # the process accepts 3 of 4 (examined 4)
    assert prior.prior("trunk") == pytest.approx(0.75, abs=0.01)
    mine = AcceptanceModel()
    assert mine.rate("trunk", prior.prior("trunk")) == pytest.approx(0.75, abs=0.01)
    for _ in range(10):
        mine.record("trunk", 4, 0)  # this request: the first token is always rejected
    assert mine.rate("trunk", prior.prior("trunk")) < 0.3


def test_the_process_prior_follows_the_recent_requests():
    prior = ProcessAcceptance()
    for _ in range(500):
        prior.record("trunk", 4, 3)  # hours of code: 3 of 4 accepted
    assert prior.prior("trunk") == pytest.approx(0.75, abs=0.01)
    for _ in range(80):
        prior.record("trunk", 4, 1)  # then text the draft gets one token of at a time (examined 2, accepted 1)
    assert 0.5 < prior.prior("trunk") < 0.6  # 160 examined tokens: two and a half half-lives


@given(st.floats(0, 1), st.integers(0, 16))
def test_expected_accepted_is_the_sum_of_powers(rate, length):
    assert expected_accepted(rate, length) == pytest.approx(sum(rate**i for i in range(1, length + 1)), abs=1e-9)


# ------------------------------------------------------------------------------------------- the planner


def test_it_proposes_nothing_when_drafting_cannot_pay():
    plan = plan_step([row(trunk=0.05, pool=0.02)] * 4, CPU_TARGET, CPU_DRAFT, max_depth=8)
    assert all(r.total == 0 for r in plan.rows) and plan.depth == 0 and plan.forwards == 0


def test_it_proposes_everything_when_acceptance_is_near_one_and_verification_is_cheap():
    gpu_target = LinearCost(0.005, 0.00002)  # nearly flat in tokens
    plan = plan_step([row(trunk=0.98, pool=0.98, hit=1.0)] * 4, gpu_target, LinearCost(0.0005, 0.0), max_depth=8)
    assert all(r.total == 8 for r in plan.rows)


def test_rows_that_do_not_pay_leave_the_draft_forwards_to_those_that_do():
    plan = plan_step([row(trunk=0.9), row(trunk=0.02, pool=0.02)], CPU_TARGET, CPU_DRAFT, max_depth=8)
    good, bad = plan.rows
    assert good.trunk > 0 and bad.total == 0


def test_a_row_without_a_draft_model_can_still_take_pool_tokens():
    plan = plan_step([row(trunk=0.9, pool=0.9, hit=1.0, can_draft=False)], CPU_TARGET, CPU_DRAFT, max_depth=8)
    assert plan.rows[0].trunk == 0 and plan.rows[0].total > 0


def test_phrase_drafting_that_emits_more_tokens_per_forward_makes_deeper_trunks_pay():
    rows = [row(trunk=0.6, hit=0.0)]
    slow = plan_step(rows, CPU_TARGET, LinearCost(0.12, 0.0), max_depth=8)
    fast = plan_step(rows, CPU_TARGET, LinearCost(0.12, 0.0), max_depth=8, shape=DraftShape(tokens_per_forward=3))
    assert fast.rows[0].trunk >= slow.rows[0].trunk and fast.expected_tokens / fast.expected_seconds > (
        slow.expected_tokens / slow.expected_seconds
    )


@settings(max_examples=80, deadline=None)
@given(
    rows=outlook_rows(max_size=8),
    intercept=st.floats(0.001, 1.0),
    slope=st.floats(0.0, 0.05),
)
def test_the_plan_is_never_worse_than_plain_decoding_by_its_own_model(rows, intercept, slope):
    target = LinearCost(intercept, slope)
    plan = plan_step(rows, target, CPU_DRAFT, max_depth=8)
    plain = len(rows) / target(len(rows))
    assert plan.expected_tokens / plan.expected_seconds >= plain * (1 - 1e-9)
    for r, outlook in zip(plan.rows, rows, strict=True):
        assert 0 <= r.trunk <= 8 and r.total <= outlook.budget
        assert r.trunk == 0 or outlook.can_draft


# ------------------------------------------------------------------------------------------- the controller


def test_the_controller_speculates_fully_until_it_has_measured_then_plans():
    controller = AdaptiveController(max_tokens=8)
    rows = [row(trunk=0.02, pool=0.02)] * 2
    assert [r.total for r in controller.plan(rows, 8).rows] == [8, 8]  # nothing measured yet
    controller.observe_draft([(2, 2, 0.03)] * 8, depth=8)
    for tokens in (18, 2, 18, 2):
        controller.observe_target_step(tokens, 0.28 + 0.02 * tokens)
    assert [r.total for r in controller.plan(rows, 8).rows] == [0, 0]  # measured: it does not pay
    assert controller.stats.lengths == {8: 2, 0: 2}
    assert "proposed lengths 0:2 8:2" in controller.summary()


def test_the_controller_compares_the_accepted_tokens_it_expected_with_what_the_target_accepted():
    controller = AdaptiveController(max_tokens=4)
    controller.observe_draft([(2, 2, 0.03)] * 8, depth=8)
    for tokens in (10, 2, 10, 2):
        controller.observe_target_step(tokens, 0.28 + 0.02 * tokens, rows=2)
    rows = [row(budget=4, trunk=0.9, pool=0.0, hit=0.0)] * 2
    controller.observe_accepted(5)  # no plan was predicted yet: not counted
    plan = controller.plan(rows, 4)
    expected = plan.expected_tokens - 2
    assert expected > 2 and controller.stats.predicted_accepted == 0.0
    controller.observe_accepted(3)
    controller.observe_accepted(7)  # a step whose plan made no prediction
    assert controller.stats.predicted_accepted == pytest.approx(expected) and controller.stats.verified_accepted == 3
    assert f"predicted/verified accepted tokens {expected / 3:.2f}" in controller.summary()


def test_the_controller_probes_when_every_step_looks_alike():
    controller = AdaptiveController(max_tokens=8)
    rows = [row(trunk=0.02, pool=0.02)]
    controller.observe_draft([(1, 1, 0.03)], depth=1)
    controller.observe_target_step(1, 0.3)
    totals = []
    for _ in range(PROBE_EVERY * 2):
        totals.append(controller.plan(rows, 8).rows[0].total)
        controller.observe_target_step(1 + totals[-1], 0.3 + 0.02 * totals[-1])
    assert totals.count(8) == 1 and totals.count(0) == 2 * PROBE_EVERY - 1  # one probe, then the slope is known


def test_a_controller_that_stopped_drafting_drafts_again_within_its_exploration_share():
    controller = AdaptiveController(max_tokens=8)
    rows = [row(trunk=0.02, pool=0.02, hit=0.5)] * 4  # the target-cost probes take pool suffixes: no draft
    controller.observe_draft([(4, 4, 0.03)] * 8, depth=8)
    for tokens in (36, 4, 36, 4):
        controller.observe_target_step(tokens, 0.28 + 0.02 * tokens)
    drafted, seconds = 0, 0.0
    for _ in range(400):
        plan = controller.plan(rows, 8)
        if plan.depth:
            drafted += 1
            controller.observe_draft([(4, 4, 0.03)] * plan.depth, depth=plan.depth)
        tokens = 4 + sum(r.total for r in plan.rows)
        controller.observe_target_step(tokens, 0.28 + 0.02 * tokens)
        seconds += 0.28 + 0.02 * tokens + (8 * 0.03 if plan.depth else 0.0)
    # It re-measures the draft now and then, never spending more than its share of the time on it.
    extra = 8 * 4 * 0.02 + 8 * (0.03 + 0.001 * 4)  # verifying 32 more tokens, 8 forwards of 4 rows
    assert drafted == controller.stats.explore_steps >= 2
    assert drafted * extra <= EXPLORE_SHARE * seconds * 1.25  # the share is spent by the fit's estimate of extra


def test_exploration_prices_the_catch_ups_it_makes_at_what_catch_ups_were_measured_to_cost():
    def explorations(catch_up_seconds_per_token: float) -> int:
        controller = AdaptiveController(max_tokens=8)
        # one forward that was mostly a catch-up (400 prompt tokens), at the given price a token, then enough
        # drafting forwards (20 ms + 1 ms a token) that the draft's fit no longer holds it
        controller.observe_draft([(4, 400, 400 * catch_up_seconds_per_token)], depth=1)
        for i in range(130):
            controller.observe_draft([(4, 4 + i % 16, 0.02 + 0.001 * (4 + i % 16))], depth=1)
        for tokens in (36, 4, 36, 4):
            controller.observe_target_step(tokens, 0.28 + 0.02 * tokens)
        rows = [replace(row(trunk=0.02, pool=0.02, hit=0.0), catch_up=150)] * 4  # each row 150 tokens behind
        for _ in range(400):
            plan = controller.plan(rows, 8)
            tokens = 4 + sum(r.total for r in plan.rows)
            controller.observe_target_step(tokens, 0.28 + 0.02 * tokens)
        return controller.stats.explore_steps

    # 600 catch-up tokens are 0.6 s at the draft fit's 1 ms a token, 3 s at a measured 5 ms: the same share of the
    # time buys fewer explorations (priced at the fit's slope, it bought as many: 2 and 2).
    cheap, dear = explorations(0.001), explorations(0.005)
    assert cheap >= 2 and dear < cheap / 2


def test_a_request_the_draft_never_drafted_for_gets_its_full_trunk_once():
    controller = AdaptiveController(max_tokens=8)
    controller.observe_draft([(2, 2, 0.03)] * 8, depth=8)
    for tokens in (27, 3, 27, 3):
        controller.observe_target_step(tokens, 0.28 + 0.02 * tokens, rows=3)
    known, new = row(trunk=0.02, pool=0.02), RowOutlook(8, 0.02, 0.02, 0.5, can_draft=True, untried=True)
    plan = controller.plan([known, new, RowOutlook(8, 0.02, 0.02, 0.5, can_draft=False, untried=True)], 8)
    assert [(r.trunk, r.total) for r in plan.rows] == [(0, 0), (8, 8), (0, 0)] and plan.depth == 8


@pytest.mark.parametrize(("rows", "token_cost", "trunk"), [(1, 0.0005, 8), (8, 0.0005, 1), (8, 0.03, 0)])
def test_a_new_request_is_tried_with_the_trunk_that_pays_at_the_try_rate(rows, token_cost, trunk):
    """Once the draft's prices are trusted, a trial is sized by them: the whole trunk at batch 1 (a draft forward
    costs a tenth of a plain step there), one token where the lone new row's forwards hold up 7 others (at batch
    8 through the server a full trunk of 8 cost about 0.5 s for 4 tokens, once for every new request), none
    where no depth pays even at TRY_RATE."""
    controller = AdaptiveController(max_tokens=8)
    for _ in range(TRUSTED_DRAFT_SAMPLES):
        controller.observe_draft([(rows, rows, 0.03)], depth=1)
    for tokens in (rows, 9 * rows, rows, 9 * rows):
        controller.observe_target_step(tokens, 0.3 + token_cost * tokens, rows=rows)
    new = RowOutlook(8, 0.02, 0.0, 0.0, can_draft=True, untried=True)
    plan = controller.plan([row(trunk=0.02, pool=0.0, hit=0.0)] * (rows - 1) + [new], 8)
    assert [r.trunk for r in plan.rows] == [0] * (rows - 1) + [trunk]


def catch_up_row(catch_up: int, remaining: int | None, trunk: float = 0.8, untried: bool = True) -> RowOutlook:
    return RowOutlook(4, trunk, 0.0, 0.0, can_draft=True, catch_up=catch_up, untried=untried, remaining=remaining)


def test_a_catch_up_pays_when_the_request_has_enough_tokens_left_to_win_it_back():
    # Batch 1: a step emits about 3 tokens a second; a trunk of 4 at rate 0.8 gains about 1.2 tokens a step over
    # its cost, for about 30 steps of a 100-token answer, against a 200-token catch-up of 0.2 s (0.6 tokens).
    ratio = 1 / CPU_TARGET(1)
    assert catch_up_pays(catch_up_row(200, 100), ratio, 1, CPU_TARGET, CPU_DRAFT, 4)
    # The same request with 2 tokens left cannot win back a 2000-token prompt (2 s, 7 tokens at that yield).
    assert not catch_up_pays(catch_up_row(2000, 2), ratio, 1, CPU_TARGET, CPU_DRAFT, 4)
    # Unknown remaining tokens, or nothing to catch up: as before, the draft may serve the row.
    assert catch_up_pays(catch_up_row(2000, None), ratio, 1, CPU_TARGET, CPU_DRAFT, 4)
    assert catch_up_pays(catch_up_row(0, 2), ratio, 1, CPU_TARGET, CPU_DRAFT, 4)


def test_a_catch_up_never_pays_where_drafting_itself_does_not():
    ratio = 1 / CPU_TARGET(1)
    assert not catch_up_pays(catch_up_row(10, 10_000, trunk=0.05, untried=False), ratio, 1, CPU_TARGET, CPU_DRAFT, 4)


def test_at_a_large_batch_a_long_prompt_with_a_short_answer_is_not_drafted_for():
    """The batch-8 case that made the planner lose to plain decoding: every new request's first trunk made the
    draft read its whole prompt (about 750 tokens of MBPP's 3-shot prompt, 1000-1500 for RAG), which 64-96
    tokens of drafting at batch 8 never paid back, even at a high acceptance."""
    controller = AdaptiveController(max_tokens=4)
    draft = LinearCost(0.030, 0.0017)  # the int8 draft on this CPU: 1.7 ms a token of prompt
    for tokens in (8, 40, 8, 40, 8, 40, 8, 40):
        controller.observe_target_step(tokens, 0.25 + 0.02 * tokens, rows=8)
    for _ in range(TRUSTED_DRAFT_SAMPLES // 3 + 1):
        controller.observe_draft([(8, 16, draft(16)), (8, 16, draft(16)), (8, 200, draft(200))], depth=3)
    long_prompts = [catch_up_row(1500, 64, trunk=0.95)] * 8
    plan = controller.plan(long_prompts, 4)
    assert plan.depth == 0 and all(r.trunk == 0 for r in plan.rows)
    assert controller.stats.catch_ups_declined == 8
    assert "draft catch-ups declined 8" in controller.summary()
    # Short prompts and long answers at the same costs and acceptance: each request is tried, with the trunk that
    # pays most at these prices (2 of 4: a verified token costs 19 ms, a forward's share 27 ms, at 19.5 tokens/s).
    plan = controller.plan([catch_up_row(20, 2000, trunk=0.95)] * 8, 4)
    assert all(r.trunk == 2 for r in plan.rows)
    # Requests known to accept 0.6 of a trunk, behind by a few tokens: at batch 8 on this CPU a trunk at that
    # rate does not pay for its verification, so the draft does not catch up on them.
    plan = controller.plan([catch_up_row(5, 2000, trunk=0.6, untried=False)] * 8, 4)
    assert all(r.trunk == 0 for r in plan.rows)


def test_a_catch_up_started_while_other_requests_are_in_prefill_is_priced_at_the_batch_they_make():
    """MBPP at batch 8: the first requests to finish their prefill decode at one or two rows, where a 780-token
    prompt's catch-up looks cheap; it is paid back, if ever, once all eight decode together, where it does not."""
    controller = AdaptiveController(max_tokens=4)
    draft = LinearCost(0.030, 0.0028)  # the int8 0.5B on this CPU: 2.8 ms a token of prompt
    for rows, base, per_token in ((1, 0.28, 0.0037), (8, 0.25, 0.0125)):
        for tokens in (rows, rows * 5) * 4:
            controller.observe_target_step(tokens, base + per_token * tokens, rows=rows)
    for _ in range(TRUSTED_DRAFT_SAMPLES // 4):  # a forward that catches rows up, then one token a row
        controller.observe_draft([(8, 200, draft(200))] + [(8, 8, draft(8))] * 3, depth=4)
    row = catch_up_row(780, 96)
    assert controller.plan([row], 4).rows[0].trunk == 4  # alone in the engine: worth it
    assert controller.plan([row], 4, requests=1).rows[0].trunk == 4
    declined = controller.stats.catch_ups_declined
    assert controller.plan([row], 4, requests=8).rows[0].trunk == 0  # seven more requests on their way
    assert controller.stats.catch_ups_declined == declined + 1


def test_catch_ups_are_not_declined_on_a_draft_fit_of_a_few_forwards():
    """The first forwards pay one-time costs; a fit of them alone must not lock the draft out (a declined row runs
    no forward, so the fit would never be corrected)."""
    controller = AdaptiveController(max_tokens=4)
    for tokens in (8, 40, 8, 40, 8, 40, 8, 40):
        controller.observe_target_step(tokens, 0.25 + 0.02 * tokens, rows=8)
    controller.observe_draft([(8, 16, 1.5)] * 4, depth=4)  # slow first forwards
    plan = controller.plan([catch_up_row(1500, 64, trunk=0.95)] * 8, 4)
    assert all(r.trunk == 4 for r in plan.rows) and controller.stats.catch_ups_declined == 0


def test_the_draft_timed_at_engine_start_is_trusted_from_the_first_request_on():
    """A server's first wave of users was tried in full while the draft was untrusted (2.4 s at batch 8): an engine
    times its draft on made-up requests at start (DraftRuntime.calibrate), and those prices decide at once. They
    price the draft only: what a step drafted and how wide (the shape) come from real rounds."""
    controller = AdaptiveController(max_tokens=4)
    for tokens in (8, 40, 8, 40, 8, 40, 8, 40):
        controller.observe_target_step(tokens, 0.25 + 0.02 * tokens, rows=8)
    draft = LinearCost(0.030, 0.0017)
    start = [(rows, tokens, draft(tokens)) for rows in (1, 2, 4, 8) for tokens in (32 * rows, rows, rows, rows)]
    shape = controller.shape()
    controller.observe_draft(start, depth=None)
    assert len(controller.costs.draft) == len(start) == TRUSTED_DRAFT_SAMPLES
    assert controller.shape() == shape
    assert draft.slope < controller.catch_up_price(0.0) < draft(32) / 32  # the catch-ups' price, intercepts shared
    plan = controller.plan([catch_up_row(1500, 64, trunk=0.95)] * 8, 4)
    assert plan.depth == 0 and controller.stats.catch_ups_declined == 8
    # Real rounds still teach the shape: two tokens a forward.
    controller.observe_draft([(1, 1, draft(1)), (1, 3, draft(3))], depth=4)
    assert controller.shape().tokens_per_forward > shape.tokens_per_forward


def test_new_requests_behind_a_low_prior_are_tried_together_at_a_large_batch():
    """HumanEval at batch 8 behind a poor warm-up (a process prior of 0.25), the draft's prices trusted from the
    start: judged alone, each new request's catch-up paid a whole draft forward's fixed cost, none paid, none was
    tried and the prior never rose (the planner proposed nothing for the whole run). With no row drafting, the
    new ones are tried together and share the forwards: each is tried."""
    controller = AdaptiveController(max_tokens=4)
    for tokens in (8, 40, 8, 40, 8, 40, 8, 40):
        controller.observe_target_step(tokens, 0.22 + 0.029 * tokens, rows=8)
    draft = LinearCost(0.040, 0.0015)
    controller.observe_draft([(rows, tokens, draft(tokens)) for rows in (1, 2, 4, 8)
                              for tokens in (32 * rows, rows, rows, rows)], depth=None)  # fmt: skip
    new = [catch_up_row(catch_up, 95, trunk=0.25) for catch_up in (120, 160, 150, 140, 130, 170, 125, 145)]
    controller.plan(new, 4)  # a batch size's first step runs plain (the yardstick)
    controller.observe_target_step(8, 0.22 + 0.029 * 8, rows=8)
    plan = controller.plan(new, 4)
    assert controller.stats.catch_ups_declined == 0 and all(r.trunk >= 1 for r in plan.rows)
    # A long prompt with a short answer is still not worth starting, tried or not.
    controller.plan([catch_up_row(1500, 30, trunk=0.25)] * 8, 4)
    assert controller.stats.catch_ups_declined == 8


def test_new_requests_share_the_forwards_of_the_rows_that_draft_or_of_each_other_when_none_does():
    """Beside rows the plan drafts for, a new request is judged as one more of them (a server's wave of new
    requests tried together caught up every prompt, 0.97x against 1.13x); with none drafting, the untried rows
    the draft can serve are judged together (each alone, none was ever tried)."""
    tried, new, undraftable = row(trunk=0.9), catch_up_row(140, 95, trunk=0.25), row(can_draft=False)
    rows = [tried, tried, new, new, undraftable]
    drafting = planner.StepPlan([planner.RowPlan(t, t) for t in (4, 4, 0, 0, 0)], 4, 4, 0.0, 0.0)
    nothing = planner.StepPlan([planner.RowPlan(0, 0)] * 5, 0, 0, 0.0, 0.0)
    assert together(rows, drafting) == {0, 1}
    assert together(rows, nothing) == {2, 3}


def test_a_new_request_is_tried_even_when_the_process_rate_is_low():
    """The process-wide rate may come from other text (a warm-up, another dataset): a new request is judged as if
    the draft suited it (TRY_RATE), so a low prior cannot stop the draft from ever being tried again."""
    controller = AdaptiveController(max_tokens=4)
    for tokens in (1, 5, 1, 5, 1, 5, 1, 5):
        controller.observe_target_step(tokens, 0.28 + 0.02 * tokens, rows=1)
    for _ in range(TRUSTED_DRAFT_SAMPLES // 4):
        controller.observe_draft([(1, 200, CPU_DRAFT(200))] + [(1, 1, CPU_DRAFT(1))] * 3, depth=4)
    plan = controller.plan([catch_up_row(150, 96, trunk=0.05)], 4)
    assert plan.rows[0].trunk == 4
    assert not catch_up_pays(catch_up_row(150, 96, trunk=0.05, untried=False), 3.0, 1, CPU_TARGET, CPU_DRAFT, 4)


def test_the_width_a_plan_pays_per_forward_leaves_out_the_first_forwards_catch_up():
    controller = AdaptiveController(max_tokens=4)
    for _ in range(20):  # 8 rows that read their 200-token prompts, then draft 2 tokens a row per forward
        controller.observe_draft([(8, 1600, 2.0), (8, 16, 0.05), (8, 16, 0.05)], depth=3)
    assert controller.shape().width_per_row == pytest.approx(2.0, rel=0.05)


def test_a_request_counts_acceptance_per_source():
    from ouroboros_vllm.algorithm.pool import PhrasePool
    from ouroboros_vllm.algorithm.proposal import Proposal
    from ouroboros_vllm.algorithm.request import DraftSettings, RequestState

    settings = DraftSettings(gamma=4, phrase_len=2, draft_phrases=0, lookahead_window=0, uses_pool=True,
                             context_ngrams=False)  # fmt: skip
    prior = ProcessAcceptance()
    state = RequestState(settings, PhrasePool(2, 4, 100, 1000), prior=prior)
    state.proposal = Proposal(tokens=[1, 2, 3, 4, 5, 6], trunk_len=4)
    counts = state.count_accepted([1, 2, 3, 4, 5, 9])  # the trunk, one pool token, then the target's own
    assert counts.accepted_tokens == 5 and counts.suffix_accepted_tokens == 1
    trunk, pool = state.acceptance.rates["trunk"], state.acceptance.rates["pool"]
    assert (trunk.accepted, trunk.examined) == (4, 4) and (pool.accepted, pool.examined) == (1, 2)
    assert prior.rates["pool"].examined == 2
    state.proposal = Proposal(tokens=[1, 2, 3, 4, 5, 6], trunk_len=4)
    state.count_accepted([1, 7])  # rejected at the trunk's second token: the pool was never examined
    assert (trunk.accepted, trunk.examined) == pytest.approx((4 * 0.9 + 1, 4 * 0.9 + 2))
    assert state.acceptance.rates["pool"].examined == 2


def test_the_target_fit_at_a_batch_size_shows_the_price_of_a_token_at_that_size():
    # Steps of 8 rows cost 0.28 s + 10 ms a token; as requests finish, smaller steps cost less per row. A fit over
    # every size mixes the two; the fit at 8 rows prices a token as the 8-row steps do.
    costs = CostModel(min_spread=4)
    rng = random.Random(1)
    for _ in range(40):
        draft_tokens = rng.randint(0, 32)
        costs.add_target_step(8, 8 + draft_tokens, 0.28 + 0.01 * (8 + draft_tokens))
    for rows in (3, 2, 1):
        for _ in range(6):
            costs.add_target_step(rows, rows, 0.08 + 0.01 * rows)
    fit = costs.target_fit(8)
    assert fit is not None and fit.slope == pytest.approx(0.01, rel=0.05)
    assert costs.target.fit is not None and costs.target.fit.slope > 0.012  # the fit over every size


# Batch 8 on this project's CPU, as measured (mt_bench, Qwen2.5-Coder 1.5B / 0.5B int8): the 8-row fit through
# speculative steps, 293 ms + 9.4 ms a token, and plain steps of about 230 ms.
B8_TARGET, B8_DRAFT, B8_PLAIN = LinearCost(0.293, 0.0094), LinearCost(0.042, 0.0015), LinearCost(0.22, 0.0015)


def test_a_plan_has_to_beat_what_a_plain_step_really_costs():
    rows = [row(budget=4, trunk=0.65, pool=0.2, hit=0.1)] * 8
    # Priced on the speculative fit alone, proposing nothing looks like a 368 ms step: drafting "pays".
    assert any(r.total for r in plan_step(rows, B8_TARGET, B8_DRAFT, 4).rows)
    nothing = plan_step(rows, B8_TARGET, B8_DRAFT, 4, plain=B8_PLAIN)
    assert [r.total for r in nothing.rows] == [0] * 8 and nothing.depth == 0
    assert nothing.expected_seconds == pytest.approx(B8_PLAIN(8))
    # Rows the draft nearly always gets right still pay for a step that verifies.
    sure = plan_step([row(budget=4, trunk=0.97, pool=0.2, hit=0.1)] * 8, B8_TARGET, B8_DRAFT, 4, plain=B8_PLAIN)
    assert all(r.trunk >= 2 for r in sure.rows)
    assert sure.expected_tokens / sure.expected_seconds > 8 / B8_PLAIN(8)


def test_a_plan_keeps_the_rows_mean_time_per_token_within_a_plain_steps():
    # 4 rows the draft nearly always gets right among 12 that cannot propose: drafting 4 tokens raises the step's
    # tokens per second (34 against 27), but every other row's tokens come 50% slower; 1 token keeps both.
    target, draft, plain = LinearCost(0.44, 0.01), LinearCost(0.03, 0.001), LinearCost(0.6, 0.0)
    rows = [row(budget=4, trunk=0.97, pool=0.0, hit=0.0)] * 4 + [row(budget=4, trunk=0.0, pool=0.0, hit=0.0)] * 12
    plan = plan_step(rows, target, draft, 4, plain=plain)
    assert plan.depth == 1 and [r.total for r in plan.rows] == [1] * 4 + [0] * 12
    assert plan.expected_tokens / plan.expected_seconds > 16 / plain(16)
    # Rows alike: the mean time per token follows the yield, and the plan drafts deep.
    assert plan_step([rows[0]] * 16, target, draft, 4, plain=plain).depth >= 3


def test_only_steps_that_verify_nothing_price_a_plain_step_at_their_own_batch_size_first():
    costs = CostModel()
    costs.add_target_step(8, 24, 0.5)
    costs.add_target_step(1, 1, 0.28)
    assert costs.plain_cost(8) is None  # one plain step elsewhere is not a fit yet
    costs.add_target_step(2, 2, 0.27)
    across = costs.plain_cost(8)  # the fit over every size, flat where one row costs more than two
    assert across is not None and across.slope == 0 and across(8) == pytest.approx(0.275, abs=0.01)
    for seconds in (0.19, 0.21, 0.2):
        costs.add_target_step(8, 8, seconds)
    assert costs.plain_cost(8) == LinearCost(0.2, 0.0)  # that size's own plain steps; the 24-token one left out
    assert "plain step" in costs.summary()


def test_a_fit_that_would_slope_down_is_flat_at_the_mean():
    fit = OnlineLinearFit(refit_every=1)
    for tokens, seconds in ((1, 0.3), (2, 0.28), (6, 0.2), (6, 0.2), (6, 0.2)):
        fit.add(tokens, seconds)
    assert fit.fit is not None and fit.fit.slope == 0 and fit.fit.intercept == pytest.approx(0.236, abs=0.005)


def test_the_controller_measures_a_plain_step_early_and_then_now_and_then():
    controller = AdaptiveController(max_tokens=4)
    controller.observe_draft([(8, 8, 0.04)] * 8, depth=8)
    for tokens in (40, 16, 40, 16):
        controller.observe_target_step(tokens, 0.3 + 0.01 * tokens, rows=8)
    rows = [row(budget=4, trunk=0.95, pool=0.0, hit=0.0)] * 8  # drafting pays: every step would propose
    empty = []
    for step in range(2 * PLAIN_PROBE_EVERY):
        plan = controller.plan(rows, 4)
        tokens = 8 + sum(r.total for r in plan.rows)
        if tokens == 8:
            empty.append(step)
        else:
            controller.observe_draft([(8, 8, 0.04)] * plan.depth, depth=plan.depth)
        controller.observe_target_step(tokens, 0.3 + 0.01 * tokens, rows=8)
    # The first soon; then never more than PLAIN_PROBE_EVERY apart (the look-alike probes also run plain here,
    # since every step would propose the same), and few: each forgoes a step's speculation.
    assert empty[0] == FIRST_PLAIN_PROBE - 1
    assert all(b - a <= PLAIN_PROBE_EVERY for a, b in itertools.pairwise(empty)) and len(empty) <= 4
    assert len(controller.costs.plain) == len(empty)
    assert controller.costs.plain_cost(8) == LinearCost(0.38, 0.0)


def test_each_batch_size_gets_its_own_plain_step():
    controller = AdaptiveController(max_tokens=4)
    controller.observe_draft([(8, 8, 0.04)] * 8, depth=8)
    for tokens in (40, 16, 40, 16):
        controller.observe_target_step(tokens, 0.3 + 0.01 * tokens, rows=8)
    empty_at = []
    for size in (8, 7, 6):
        for _ in range(FIRST_PLAIN_PROBE):
            plan = controller.plan([row(budget=4, trunk=0.95, pool=0.0, hit=0.0)] * size, 4)
            tokens = size + sum(r.total for r in plan.rows)
            if tokens == size:
                empty_at.append(size)
            controller.observe_target_step(tokens, 0.3 + 0.01 * tokens, rows=size)
    assert empty_at == [8, 7, 6]


def test_a_new_batch_size_runs_plain_first_even_where_only_new_requests_would_be_tried():
    controller = AdaptiveController(max_tokens=8)
    for _ in range(TRUSTED_DRAFT_SAMPLES):
        controller.observe_draft([(8, 8, 0.01)], depth=1)
    for tokens in (1, 9, 1, 9):  # the target measured at 1 row only
        controller.observe_target_step(tokens, 0.3 + 0.0005 * tokens, rows=1)
    rows = [RowOutlook(8, 0.02, 0.0, 0.0, can_draft=True, untried=True)] * 8  # eight new requests
    first = controller.plan(rows, 8)
    assert all(r.total == 0 for r in first.rows) and controller.stats.probe_steps == 1
    controller.observe_target_step(8, 0.45, rows=8)
    second = controller.plan(rows, 8)
    assert all(r.trunk for r in second.rows)  # tried, now that a plain step at 8 rows prices the trials


def test_before_any_batch_size_shows_a_slope_a_larger_one_is_priced_from_the_fit_over_every_size_scaled_up():
    costs = CostModel(min_spread=2)
    for tokens in (9, 9, 9, 1):  # a server's warm-up request: too few steps for a size to show a slope
        costs.add_target_step(1, tokens, 0.4 + 0.006 * tokens)
    every = costs.target.fit
    assert every is not None and every.slope > 0
    assert costs.target_fit(1) == every
    assert costs.target_fit(8) == LinearCost(every.intercept, 8 * every.slope)  # not 1 row's price of a token
    costs.add_target_step(8, 8, 0.45)  # a plain step at 8 rows says nothing of a token's price there
    every = costs.target.fit
    assert every is not None and costs.target_fit(8) == LinearCost(every.intercept, 8 * every.slope)
    costs.add_target_step(8, 24, 0.9)  # a step that verified drafts at 8 rows: the fit is priced from there
    every = costs.target.fit
    assert every is not None and costs.target_fit(8) == every
    assert costs.target_fit(16) == LinearCost(every.intercept, 2 * every.slope)


def test_a_batch_size_without_its_own_fit_is_priced_from_the_nearest_one_scaled_up_not_down():
    costs = CostModel(min_spread=2)
    for i in range(12):
        tokens = 1 + i % 5
        costs.add_target_step(1, tokens, 0.28 + 0.0037 * tokens)
    one = costs.target_by_rows[1].fit
    assert one is not None and one.slope == pytest.approx(0.0037, rel=0.3)
    assert costs.target_fit(8) == LinearCost(one.intercept, 8 * one.slope)  # 1 row's price of a token, x8
    for i in range(12):
        tokens = 8 + 4 * (i % 5)
        costs.add_target_step(8, tokens, 0.2 + 0.013 * tokens)
    eight = costs.target_by_rows[8].fit
    assert eight is not None and eight.slope == pytest.approx(0.013, rel=0.3)
    assert costs.target_fit(8) == eight  # its own, once it shows a slope
    assert costs.target_fit(6) == eight  # the nearest size is larger: its price as is
    assert costs.target_fit(3) == LinearCost(one.intercept, 3 * one.slope)  # nearer to 1 row than to 8


def _measured_at_batch_8() -> AdaptiveController:
    """A controller whose draft forwards and 8-row target steps (both sizes, so with a slope) were measured."""
    controller = AdaptiveController(max_tokens=4)
    controller.observe_draft([(8, 8, 0.04)] * 40, depth=40)
    for tokens in (40, 16, 40, 16, 8, 8):
        controller.observe_target_step(tokens, 0.2 + 0.01 * tokens, rows=8)
    return controller


def test_an_acceptance_model_that_keeps_expecting_too_much_is_scaled_down_until_the_plan_stops_proposing():
    controller = _measured_at_batch_8()
    rows = [row(budget=4, trunk=0.8, pool=0.0, hit=0.0)] * 8
    assert controller.acceptance_scale() == 1.0
    first = controller.plan(rows, 4)
    assert any(r.total for r in first.rows)
    proposed = []
    for _ in range(60):  # the target accepts a third of what the plans expect
        plan = controller.plan(rows, 4)
        proposed.append(sum(r.total for r in plan.rows))
        controller.observe_target_step(8 + proposed[-1], 0.2 + 0.01 * (8 + proposed[-1]), rows=8)
        controller.observe_accepted(round((plan.expected_tokens - 8) / controller.acceptance_scale() / 3))
    assert controller.acceptance_scale() < 0.6  # towards a third, within the bound of a half
    assert proposed[-1] < proposed[0] and controller.stats.verified_accepted < controller.stats.predicted_accepted


def test_the_pool_s_tokens_are_calibrated_apart_from_the_trunk_s():
    """The pool's suffixes never accepted, the trunk's tokens as expected: the pool's scale falls to its bound and
    the trunk's stays; the plans go from the pool's suffixes alone to the draft model's trunks."""
    controller = _measured_at_batch_8()
    rows = [row(budget=4, trunk=0.6, pool=0.5, hit=1.0)] * 8
    first = controller.plan(rows, 4)
    assert first.expected_pool > 0
    for _ in range(60):
        plan = controller.plan(rows, 4)
        controller.observe_target_step(8 + sum(r.total for r in plan.rows), 0.3, rows=8)
        trunk = (plan.expected_tokens - 8 - plan.expected_pool) / controller.acceptance_scale()
        controller.observe_accepted(round(trunk), 0)
    assert controller.pool_scale() == 0.5 and 0.9 < controller.acceptance_scale() < 1.1
    last = controller.plan(rows, 4)
    assert all(r.trunk == 0 for r in first.rows) and all(r.trunk > 0 for r in last.rows)  # pool only, then trunks
    assert last.expected_pool < first.expected_pool


def test_steps_that_keep_taking_longer_than_predicted_raise_the_price_until_the_plan_stops_proposing():
    controller = _measured_at_batch_8()
    rows = [row(budget=4, trunk=0.75, pool=0.0, hit=0.0)] * 8
    assert controller.time_scale() == 1.0
    proposed, scales = [], []
    for _ in range(120):  # a speculative step takes 1.4 times what the cost model says; acceptance is as expected
        scales.append(controller.time_scale())
        plan = controller.plan(rows, 4)
        proposed.append(sum(r.total for r in plan.rows))
        seconds = plan.expected_seconds / scales[-1] * (1.4 if proposed[-1] else 1.0)
        controller.observe_target_step(8 + proposed[-1], seconds, rows=8)
        controller.observe_accepted(round((plan.expected_tokens - 8) / controller.acceptance_scale()))
    # Up from 1 while the plans propose, until proposing no longer pays at that price; then, without evidence,
    # back towards 1 step by step, until the plans propose (and are measured) again.
    stopped = proposed.index(0)
    assert proposed[0] > 0 and 1.1 < scales[stopped] <= 1.4
    settling = zip(scales[stopped : stopped + 19], scales[stopped + 1 : stopped + 20], strict=True)
    assert all(later < earlier for earlier, later in settling)
    planned_again = [i for i in range(stopped + 20, 120) if proposed[i] and scales[i] < scales[stopped]]
    assert planned_again and 0.9 < controller.acceptance_scale() < 1.1


def test_a_step_whose_draft_catches_a_row_up_does_not_move_the_time_calibration():
    """The plans leave a catch-up's cost out (it is judged apart): its step's time says nothing of their prices."""
    controller = AdaptiveController(max_tokens=4)
    controller.observe_draft([(1, 8, 0.04)] * 40, depth=40)
    for tokens in (5, 2, 5, 2, 1, 1):
        controller.observe_target_step(tokens, 0.2 + 0.01 * tokens, rows=1)
    resumed = RowOutlook(4, 0.95, 0.0, 0.0, can_draft=True, catch_up=300, remaining=10_000)
    plan = controller.plan([resumed], 4)
    assert plan.rows[0].trunk > 0  # it pays: a long request, a high acceptance
    controller.observe_target_step(1 + plan.rows[0].total, 10 * plan.expected_seconds, rows=1)
    assert controller.time_scale() == 1.0
    plan = controller.plan([replace(resumed, catch_up=1)], 4)
    controller.observe_target_step(1 + plan.rows[0].total, 10 * plan.expected_seconds, rows=1)
    assert controller.time_scale() > 1.0


def _inliers_by_size(x, y, fit: LinearCost):
    """The outlier rule written plainly, one size at a time (the reference for the vectorised one)."""
    import numpy as np

    from ouroboros_vllm.algorithm import cost_model as cm

    keep = np.ones(len(y), dtype=bool)
    for size in np.unique(x):
        group = x == size
        if group.sum() >= 3:
            median = float(np.median(y[group]))
            spread = max(float(np.median(np.abs(y[group] - median))), cm.OUTLIER_FLOOR * median)
            keep[group] = np.abs(y[group] - median) <= cm.OUTLIER_MADS * spread
        else:
            expected = max(fit(size), 1e-12)
            keep[group] = (y[group] <= cm.OUTLIER_RATIO * expected) & (y[group] >= expected / cm.OUTLIER_RATIO)
    return keep


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 12), st.floats(0.001, 2.0, allow_nan=False)).filter(lambda s: s[1] > 0),
        min_size=1,
        max_size=64,
    ),
    st.floats(0.0, 0.5),
    st.floats(0.0, 0.05),
)
def test_the_outlier_rule_keeps_what_the_per_size_rule_keeps(samples, intercept, slope):
    import numpy as np

    from ouroboros_vllm.algorithm.cost_model import _inliers

    x = np.array([float(size) for size, _ in samples])
    y = np.array([seconds for _, seconds in samples])
    fit = LinearCost(intercept, slope)
    assert (_inliers(x, y, fit) == _inliers_by_size(x, y, fit)).all()


def _ridge_by_solver(x, y) -> LinearCost:
    """The fit's normal equations through a general solver (the reference for the closed form)."""
    import numpy as np

    from ouroboros_vllm.algorithm import cost_model as cm

    intercept0 = float(np.median(y / (1 + cm.PRIOR_SLOPE_FRACTION * x)))
    design = np.stack([np.ones_like(x), x], axis=1)
    scale = np.array([1.0, max(float(np.mean(x)), 1.0)])
    prior = np.array([intercept0, intercept0 * cm.PRIOR_SLOPE_FRACTION])
    gram = design.T @ design + cm.PRIOR_WEIGHT * np.diag(scale**2)
    rhs = design.T @ y + cm.PRIOR_WEIGHT * np.diag(scale**2) @ prior
    intercept, slope = np.linalg.solve(gram, rhs)
    if slope < 0:
        weight = cm.PRIOR_WEIGHT * float(scale[0]) ** 2
        return LinearCost(max((float(y.sum()) + weight * intercept0) / (len(y) + weight), 0.0), 0.0)
    if intercept < 0:
        weight = cm.PRIOR_WEIGHT * float(scale[1]) ** 2
        slope = (float(x @ y) + weight * float(prior[1])) / (float(x @ x) + weight)
    return LinearCost(max(float(intercept), 0.0), max(float(slope), 0.0))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.floats(1e-4, 5.0, allow_nan=False)), min_size=1, max_size=64))
def test_the_closed_form_fit_equals_the_solver_fit(samples):
    """The fit's arithmetic, checked against the general solver it replaced."""
    import numpy as np

    from ouroboros_vllm.algorithm.cost_model import _ridge

    x = np.array([float(size) for size, _ in samples])
    y = np.array([seconds for _, seconds in samples])
    mine, reference = _ridge(x, y), _ridge_by_solver(x, y)
    assert mine.intercept == pytest.approx(reference.intercept, rel=1e-9, abs=1e-12)
    assert mine.slope == pytest.approx(reference.slope, rel=1e-9, abs=1e-12)


def test_a_fit_is_refitted_after_each_of_its_first_samples_then_every_few():
    fit = OnlineLinearFit(refit_every=4)
    seen = []
    for i in range(12):
        fit.add(1 + i % 3, 0.1 * (1 + i))
        seen.append(fit.fit)
    changed = [i for i in range(1, 12) if seen[i] != seen[i - 1]]
    assert changed == [1, 2, 3, 7, 11]


def _plan_step_one_depth_at_a_time(rows, target, draft, max_depth, shape, plain, scale):
    """The planner as first written (a Dinkelbach iteration per depth, in a loop): the reference for the planner
    that searches every depth at once."""
    options = planner._Options(rows, scale)
    base_tokens, base_seconds, index = float(len(rows)), target(len(rows)), np.arange(len(rows))
    best = (base_tokens / plain(len(rows)), None)
    for depth in range(max_depth + 1):
        forwards = math.ceil(depth / max(shape.tokens_per_forward, 1.0)) if depth else 0
        trunk = np.where(options.can_draft, np.minimum(depth, options.budgets), 0)
        valid = options.fits & (options.q[None] <= trunk[:, None, None])
        per_row = forwards * draft.slope * shape.width_per_row
        cost = options.tokens[None] * target.slope + (options.q[None] > 0) * per_row
        gain = np.where(valid, options.gain, -np.inf).reshape(len(rows), -1)
        cost = np.broadcast_to(cost, options.gain.shape).reshape(len(rows), -1)
        drafts, ratio = (options.q > 0).reshape(-1), base_tokens / base_seconds
        for _ in range(16):
            pick = np.argmax(gain - ratio * cost, axis=1)
            fixed = forwards * draft.intercept if drafts[pick].any() else 0.0
            tokens, seconds = (
                base_tokens + float(gain[index, pick].sum()),
                base_seconds + float(cost[index, pick].sum()) + fixed,
            )
            if abs(tokens / seconds - ratio) <= 1e-12 * ratio:
                break
            ratio = tokens / seconds
        q, s = np.unravel_index(pick, options.tokens.shape)
        totals = [int(q[r] + s[r]) for r in range(len(rows))]
        mean_time_per_token = seconds * float(np.mean(1.0 / (1.0 + gain[index, pick])))
        if any(totals) and tokens / seconds > best[0] and mean_time_per_token <= plain(len(rows)):
            trunks = [int(trunk[r]) if q[r] else 0 for r in range(len(rows))]
            best = (tokens / seconds, (trunks, totals, depth if drafts[pick].any() else 0, tokens, seconds))
    return best[1]


@settings(max_examples=150, deadline=None)
@given(
    rows=outlook_rows(max_size=16),
    intercept=st.floats(0.001, 1.0),
    slope=st.floats(0.0, 0.05),
    draft_intercept=st.floats(0.0, 0.1),
    draft_slope=st.floats(0.0, 0.01),
    tokens_per_forward=st.floats(1.0, 4.0),
    plain_factor=st.floats(0.5, 1.5),
    scale=st.floats(0.5, 1.5),
    max_depth=st.integers(0, 8),
)
def test_searching_every_depth_at_once_plans_what_one_depth_at_a_time_did(
    rows, intercept, slope, draft_intercept, draft_slope, tokens_per_forward, plain_factor, scale, max_depth
):
    target, draft = LinearCost(intercept, slope), LinearCost(draft_intercept, draft_slope)
    shape, plain = DraftShape(tokens_per_forward=tokens_per_forward), LinearCost(intercept * plain_factor, slope)
    plan = plan_step(rows, target, draft, max_depth, shape=shape, plain=plain, acceptance_scale=scale)
    reference = _plan_step_one_depth_at_a_time(rows, target, draft, max_depth, shape, plain, scale)
    if reference is None:
        assert not any(r.total for r in plan.rows) and plan.depth == 0
        assert plan.expected_seconds == plain(len(rows))
    else:
        trunks, totals, depth, tokens, seconds = reference
        assert [r.trunk for r in plan.rows] == trunks and [r.total for r in plan.rows] == totals
        assert (plan.depth, plan.expected_tokens, plan.expected_seconds) == (depth, tokens, seconds)


@settings(max_examples=100, deadline=None)
@given(
    rates=st.lists(st.floats(0, 1), min_size=0, max_size=12),
    width=st.integers(1, 9),
    alternatives=st.integers(0, 3),
    branch_len=st.integers(0, 4),
)
def test_every_rows_pool_gains_at_once_equal_each_rows(rates, width, alternatives, branch_len):
    rows = [replace(row(pool=rate), alternatives=alternatives * (i % 2), branch_len=branch_len, branch_rate=rate / 2)
            for i, rate in enumerate(rates)]  # fmt: skip
    gains = planner._pool_gains(rows, np.array([outlook.pool_rate for outlook in rows]), width)
    assert gains.shape == (len(rows), width)
    for i, outlook in enumerate(rows):
        assert np.array_equal(gains[i], planner.pool_gains(outlook, width))


def test_a_catch_up_is_priced_at_what_catch_up_forwards_cost():
    """MBPP at batch 8: the first forward read 8 prompts (1655 tokens once their common 3-shot prefix was shared)
    in 3.8 s, 2.3 ms a token, where the draft fit's slope (short forwards) said ~1.4 ms: catch-ups are priced
    at the measured rate, and one that pays at the slope may not at that rate."""
    controller = AdaptiveController(4)
    assert controller.catch_up_price(0.0014) == 0.0014  # nothing measured: the slope
    controller.observe_draft([(8, 1655, 3.82), (8, 8, 0.045), (8, 8, 0.045)], depth=3)
    controller.observe_draft([(8, 16, 0.05), (8, 8, 0.045)], depth=2)  # a first forward of routine width
    assert controller.catch_up_price(0.0014) == pytest.approx(3.82 / 1655)
    assert controller.catch_up_price(0.01) == 0.01  # never below the fit's slope
    target, draft = LinearCost(0.25, 0.0125), LinearCost(0.030, 0.0014)
    row = RowOutlook(4, 0.8, 0.0, 0.0, can_draft=True, catch_up=320, remaining=60.0)
    ratio = 8 / target(8)
    assert catch_up_pays(row, ratio, 8, target, draft, 4)
    assert not catch_up_pays(row, ratio, 8, target, draft, 4, per_token=controller.catch_up_price(draft.slope))


def test_a_catch_up_is_priced_at_the_forwards_of_the_rows_that_will_draft_not_of_every_row_the_plan_drafts():
    """Batch 8: a plan that drafts every row shares each forward eight ways, but the rows whose catch-ups do not pay
    will not draft. A catch-up judged as if they did paid for 2.5 accepted tokens each in the policy replay of the
    batch-8 benchmark (docs/benchmarks.md); judged with the rows that will draft, it is declined."""
    from ouroboros_vllm.algorithm.planner import RowPlan, StepPlan
    from ouroboros_vllm.algorithm.step_plans import affordable_rows

    target, draft, shape = LinearCost(0.134, 0.012), LinearCost(0.0325, 0.00182), DraftShape()
    plain_yield = 8 / target(8)
    caught_up = catch_up_row(2, 40, trunk=0.9, untried=False)
    behind = catch_up_row(60, 40, trunk=0.85, untried=False)
    unpaid = catch_up_row(900, 40, trunk=0.85, untried=False)  # a long prompt: never worth it at batch 8
    plan = StepPlan([RowPlan(1, 1)] * 8, depth=1, forwards=1, expected_tokens=14.0, expected_seconds=0.35)

    # Seven rows whose catch-ups do not pay: the one behind by 60 tokens would draft with the caught-up row alone.
    rows = [caught_up, behind] + [unpaid] * 6
    kept = affordable_rows(rows, plan, target, draft, 4, shape, None, 0.0023, plain_yield)
    assert [row.can_draft for row in kept] == [True, False] + [False] * 6
    # Seven rows behind by 60 tokens: each pays when the eight share the forwards, so all are kept.
    rows = [caught_up] + [behind] * 7
    assert affordable_rows(rows, plan, target, draft, 4, shape, None, 0.0023, plain_yield) is rows
