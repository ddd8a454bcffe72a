"""The planner's safety net: where speculative steps measured slower than plain decoding, steps run plain."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.adaptive import AdaptiveController
from ouroboros_vllm.algorithm.planner import RowOutlook
from ouroboros_vllm.algorithm.yield_guard import BURST, EXPLORE_SHARE, MIN_STEPS, YieldGuard, bucket


def run(guard: YieldGuard, steps: int, rows: int, plain_seconds: float, speedup: float, spec_seconds: float) -> list:
    """``steps`` steps at ``rows`` rows, each speculative when the guard allows it: a plain step takes
    ``plain_seconds``; a speculative one ``spec_seconds`` and emits what plain decoding would in ``speedup`` times
    as long."""
    kinds = []
    for _ in range(steps):
        spec = guard.allows(rows)
        if spec:
            guard.observe(rows, True, spec_seconds, speedup * spec_seconds)
        else:
            guard.observe(rows, False, plain_seconds, plain_seconds)
        kinds.append(spec)
    return kinds


def test_the_guard_judges_a_bucket_of_batch_sizes_once_it_has_seen_enough_speculative_steps():
    assert [bucket(rows) for rows in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [0, 1, 2, 2, 3, 3, 4, 4, 5]
    guard = YieldGuard()
    for i in range(7):
        assert guard.allows(8) and not guard.losing(8)
        guard.observe(5 + i % 4, True, 1.0, 0.5)  # rows 5-8 share their evidence
    assert guard.losing(6) and not guard.allows(8) and guard.plain_steps == 1
    assert guard.allows(4) and guard.allows(9)  # other buckets judge on their own evidence
    assert guard.summary(8) == ", speculative steps' speedup at 8 rows 0.50, steps run plain by the guard 1"


@given(
    rows=st.integers(1, 16),
    plain_seconds=st.floats(0.05, 1.0),
    speedup=st.floats(0.2, 0.95),
    length=st.floats(1.0, 5.0),
)
def test_speculation_that_loses_costs_at_most_the_exploration_share(rows, plain_seconds, speedup, length):
    """From the first step on, speculation that is slower than plain decoding loses at most EXPLORE_SHARE of
    the time, besides the steps that taught the guard (MIN_STEPS) and one burst."""
    guard = YieldGuard()
    spec_seconds = length * plain_seconds
    kinds = run(guard, 2000, rows, plain_seconds, speedup, spec_seconds)
    spec_steps = kinds.count(True)
    elapsed = spec_steps * spec_seconds + (len(kinds) - spec_steps) * plain_seconds
    lost = spec_steps * spec_seconds * (1 - speedup)  # against emitting the same tokens by plain decoding
    assert lost <= EXPLORE_SHARE * elapsed + (BURST + MIN_STEPS + 1) * spec_seconds
    assert guard.plain_steps == len(kinds) - spec_steps


@given(rows=st.integers(1, 16), plain_seconds=st.floats(0.05, 1.0), speedup=st.floats(1.0, 4.0))
def test_speculation_that_pays_is_never_set_aside(rows, plain_seconds, speedup):
    guard = YieldGuard()
    assert all(run(guard, 300, rows, plain_seconds, speedup, 2 * plain_seconds))
    assert guard.plain_steps == 0


def test_a_burst_finds_speculation_paying_again():
    guard = YieldGuard()
    run(guard, 100, 8, 0.5, 0.6, 1.0)  # speculation at 0.6x: set aside
    assert guard.losing(8)
    kinds = run(guard, 3000, 8, 0.5, 1.5, 1.0)  # now at 1.5x: the next burst finds it
    assert not guard.losing(8) and all(kinds[-100:])
    # The burst came when 2% of the time run plain covered 8 steps of the old loss (0.4 s each).
    assert kinds.index(True) <= BURST * 0.4 / (EXPLORE_SHARE * 0.5) + 1


def planned_steps(controller: AdaptiveController, steps: int, slow_by: float) -> list[bool]:
    """Steps of 8 rows whose plans propose (acceptance 0.95, a cheap draft) but whose speculative steps take
    ``slow_by`` seconds more than the cost model says (catch-ups, say, which its prices leave out)."""
    rows = [RowOutlook(4, 0.95, 0.0, 0.0, can_draft=True)] * 8
    kinds = []
    for _ in range(steps):
        plan = controller.plan(rows, 4)
        proposed = sum(r.total for r in plan.rows)
        if plan.depth:
            controller.observe_draft([(8, 8, 0.04)] * plan.depth, depth=plan.depth)
        seconds = 0.3 + 0.01 * (8 + proposed) + (slow_by if proposed else 0.0)
        controller.observe_target_step(8 + proposed, seconds, rows=8)
        controller.observe_emitted(8 + proposed // 2)  # half of what it proposed was accepted
        kinds.append(proposed > 0)
    return kinds


def measured_controller() -> AdaptiveController:
    controller = AdaptiveController(max_tokens=4)
    controller.observe_draft([(8, 8, 0.04)] * 8, depth=8)
    for tokens in (40, 16, 40, 16):
        controller.observe_target_step(tokens, 0.3 + 0.01 * tokens, rows=8)
    controller.observe_target_step(8, 0.38, rows=8)  # a plain step: the guard's yardstick
    return controller


def test_a_controller_whose_steps_measure_slower_than_plain_plans_plain_steps():
    controller = measured_controller()
    kinds = planned_steps(controller, 300, slow_by=0.6)
    assert controller.guard.losing(8)
    assert sum(kinds[-250:]) <= BURST  # at most one burst, where every step would have speculated
    assert controller.stats.guard_plain_steps >= 100  # the plans propose less by themselves as their time scale rises
    assert "steps run plain by the guard" in controller.summary()


def test_a_controller_whose_steps_pay_is_left_alone():
    controller = measured_controller()
    kinds = planned_steps(controller, 300, slow_by=0.0)
    assert not controller.guard.losing(8) and controller.stats.guard_plain_steps == 0
    assert sum(kinds) >= 280  # all but the controller's own probes


def test_a_step_with_a_prompt_chunk_beside_it_is_not_judged():
    controller = measured_controller()
    controller.plan([RowOutlook(4, 0.95, 0.0, 0.0, can_draft=True)] * 8, 4)  # 32 tokens proposed
    controller.observe_target_step(8 + 32 + 300, 3.0, rows=9)  # a new request's prompt chunk in the step
    controller.observe_emitted(20)
    assert not controller.guard._buckets
    controller.plan([RowOutlook(4, 0.95, 0.0, 0.0, can_draft=True)] * 8, 4)
    controller.observe_target_step(7 + 32, 0.7, rows=7)  # a request finished: the step is still judged
    controller.observe_emitted(20)
    assert controller.guard._buckets[bucket(8)].steps == 1.0


def test_the_yardstick_is_a_plain_step_measured_at_that_batch_size():
    """Plain steps measured at 8 and 16 rows only: what one at 1 row costs is the cost model's guess from them (on
    a CPU a plain step is not even monotonic in rows). A step at 1 row is judged once a plain step was measured
    at 1 row, never against that guess, which could have set speculation at batch 1 aside after a busy spell."""
    controller = AdaptiveController(max_tokens=4)
    for rows, seconds in ((8, 0.4), (16, 0.9), (8, 0.4), (16, 0.9)):
        controller.observe_target_step(rows, seconds, rows=rows)
    assert controller.costs.plain_cost(1) is not None and controller.costs.plain_at(1) is None
    one = [RowOutlook(4, 0.95, 0.0, 0.0, can_draft=True)]
    controller.plan(one, 4)
    controller.observe_target_step(5, 0.3, rows=1)
    controller.observe_emitted(5)
    assert bucket(1) not in controller.guard._buckets
    controller.observe_target_step(1, 0.28, rows=1)  # a plain step at 1 row: the yardstick
    controller.plan(one, 4)
    controller.observe_target_step(5, 0.3, rows=1)
    controller.observe_emitted(5)
    assert controller.guard._buckets[bucket(1)].speedup() == pytest.approx(5 * 0.28 / 0.3)
