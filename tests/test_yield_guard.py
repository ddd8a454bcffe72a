"""The planner's safety net: speculation measured slower than plain steps at a batch size runs plain there."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.adaptive import AdaptiveController
from ouroboros_vllm.algorithm.planner import RowOutlook
from ouroboros_vllm.algorithm.yield_guard import BURST, EXPLORE_SHARE, MIN_PLAIN, MIN_SPECULATIVE, YieldGuard


def run(guard: YieldGuard, steps: int, rows: int, plain: tuple[int, float], speculative: tuple[int, float]) -> list:
    """``steps`` steps at ``rows`` rows, each speculative when the guard allows: (tokens, seconds) per kind."""
    kinds = []
    for _ in range(steps):
        spec = guard.allows(rows)
        tokens, seconds = speculative if spec else plain
        guard.observe(rows, spec, tokens, seconds)
        kinds.append(spec)
    return kinds


def test_the_guard_judges_only_with_both_kinds_measured():
    guard = YieldGuard()
    for _ in range(20):
        guard.observe(8, True, 8, 1.0)  # speculation at half of plain's rate, but no plain step yet
    assert guard.allows(8) and not guard.losing(8)
    for _ in range(int(MIN_PLAIN) + 1):
        guard.observe(8, False, 8, 0.5)
    assert guard.losing(8) and not guard.allows(8) and guard.plain_steps == 1
    assert guard.allows(4)  # each batch size on its own evidence
    assert guard.summary(8) == "speculative/plain tokens per second at 8 rows 0.50"


@given(
    rows=st.integers(1, 16),
    plain_seconds=st.floats(0.05, 1.0),
    slowdown=st.floats(1.05, 4.0),
    extra_tokens=st.integers(0, 8),
)
def test_speculation_that_loses_costs_at_most_the_exploration_share(rows, plain_seconds, slowdown, extra_tokens):
    """Speculation that emits fewer tokens a second than plain: after the guard has seen enough of both, the
    bursts that measure it again cost at most EXPLORE_SHARE of the time (and one burst), from the first steps on
    (the first MIN_SPECULATIVE steps speculate: that is how it learns)."""
    guard = YieldGuard()
    spec_tokens = rows + extra_tokens
    spec_seconds = plain_seconds * slowdown * spec_tokens / rows  # its rate is plain's / slowdown
    for _ in range(int(MIN_PLAIN) + 1):
        guard.observe(rows, False, rows, plain_seconds)
    kinds = run(guard, 2000, rows, (rows, plain_seconds), (spec_tokens, spec_seconds))
    spec_steps = kinds.count(True)
    elapsed = spec_steps * spec_seconds + (len(kinds) - spec_steps) * plain_seconds
    lost = spec_steps * (spec_seconds - spec_tokens * plain_seconds / rows)  # against emitting them at plain's rate
    assert lost <= EXPLORE_SHARE * elapsed + (BURST + MIN_SPECULATIVE + 1) * spec_seconds
    assert guard.plain_steps >= len(kinds) - spec_steps - 1


@given(rows=st.integers(1, 16), plain_seconds=st.floats(0.05, 1.0), gain=st.floats(1.01, 4.0))
def test_speculation_that_pays_is_never_set_aside(rows, plain_seconds, gain):
    guard = YieldGuard()
    for _ in range(10):
        guard.observe(rows, False, rows, plain_seconds)
    assert all(run(guard, 200, rows, (rows, plain_seconds), (2 * rows, 2 * plain_seconds / gain)))
    assert guard.plain_steps == 0


def test_a_burst_finds_speculation_paying_again():
    guard = YieldGuard()
    for _ in range(10):
        guard.observe(8, False, 8, 0.5)
    run(guard, 100, 8, (8, 0.5), (10, 1.0))  # speculation at 0.62x: set aside
    assert guard.losing(8)
    kinds = run(guard, 3000, 8, (8, 0.5), (24, 1.0))  # now at 1.5x: the next burst finds it
    assert not guard.losing(8) and all(kinds[-100:])
    # the burst came within the share's schedule: BURST steps of the old cost, earned at EXPLORE_SHARE
    old_cost = 1.0 - 10 * 0.5 / 8
    assert kinds.index(True) <= BURST * old_cost / (EXPLORE_SHARE * 0.5) + 1


def test_a_controller_whose_steps_measure_slower_than_plain_plans_plain_steps():
    """The model says drafting pays (acceptance 0.95 at a cheap draft), but the steps it plans emit fewer tokens
    a second than plain ones (the rows' catch-ups, say, which its prices leave out): the guard sets them aside."""
    controller = AdaptiveController(max_tokens=4)
    controller.observe_draft([(8, 8, 0.04)] * 8, depth=8)
    for tokens in (40, 16, 40, 16):
        controller.observe_target_step(tokens, 0.3 + 0.01 * tokens, rows=8)
    rows = [RowOutlook(4, 0.95, 0.0, 0.0, can_draft=True)] * 8
    kinds = []
    for _ in range(300):
        plan = controller.plan(rows, 4)
        proposed = sum(r.total for r in plan.rows)
        if plan.depth:
            controller.observe_draft([(8, 8, 0.04)] * plan.depth, depth=plan.depth)
        controller.observe_target_step(8 + proposed, 0.3 + 0.01 * (8 + proposed) + (0.6 if proposed else 0.0), rows=8)
        controller.observe_emitted(8, 8 + proposed // 2)  # half of what it proposed was accepted
        kinds.append(proposed > 0)
    assert controller.guard.losing(8)
    assert sum(kinds[-200:]) <= BURST  # at most one burst, where each step would have speculated
    assert controller.stats.guard_plain_steps >= 150
    assert "steps run plain by it" in controller.summary()


def test_a_step_with_a_prompt_chunk_beside_it_is_not_compared():
    controller = AdaptiveController(max_tokens=4)
    controller.plan([RowOutlook(4, 0.95, 0.0, 0.0, can_draft=True)] * 2, 4)  # 8 tokens proposed, 2 rows
    controller.observe_target_step(2 + 8 + 300, 2.0, rows=3)  # a new request's prompt chunk in the step
    controller.observe_emitted(2, 10)
    assert not controller.guard._sizes
    controller.plan([RowOutlook(4, 0.95, 0.0, 0.0, can_draft=True)] * 2, 4)
    controller.observe_target_step(2 + 8, 0.5, rows=2)
    controller.observe_emitted(2, 10)
    assert controller.guard._sizes[2].speculative.steps == 1.0
