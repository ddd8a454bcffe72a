"""The acceptance profile by position: what it learns from verification, and what the planner does with it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.acceptance import (
    POSITIONS,
    PositionProfile,
    ProbabilityCalibration,
    ProcessAcceptance,
    conditional_rates,
    reach_chances,
)
from ouroboros_vllm.algorithm.cost_model import LinearCost
from ouroboros_vllm.algorithm.planner import DraftShape, RowOutlook, plan_step, pool_gains
from ouroboros_vllm.algorithm.step_plans import catch_up_pays


def simulate(profile: PositionProfile, rate: float, by_position: list[float], rounds: int, seed: int = 0) -> None:
    """``rounds`` four-token proposals whose i-th token is accepted with chance ``by_position[i]`` given the ones
    before it, recorded as proposed at ``rate``."""
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        accepted = 0
        while accepted < len(by_position) and rng.random() < by_position[accepted]:
            accepted += 1
        profile.record(len(by_position), accepted, rate)


def test_a_profile_learns_that_deep_tokens_are_likelier_and_a_first_one_less():
    profile = PositionProfile()
    simulate(profile, 0.79, [0.73, 0.78, 0.82, 0.86], rounds=3000)  # MT-Bench's trunk, measured
    offsets = profile.offsets()
    assert offsets[0] < -0.2 and offsets[3] > 0.3
    assert list(offsets[:4]) == sorted(offsets[:4])
    assert offsets[4:] == (0.0,) * (POSITIONS - 4)  # never examined: the request's own rate
    rates = conditional_rates(np.array([0.79]), offsets, 4)[0]
    assert rates == pytest.approx([0.73, 0.78, 0.82, 0.86], abs=0.03)


def test_a_profile_is_not_fooled_by_easy_requests_reaching_deep_positions_more_often():
    """Requests at 0.3 and 0.95, each token accepted independently at its request's rate: the deep positions
    are reached mostly by the easy requests, so their raw accepted fraction rises with depth; measured against
    each request's own rate, there is nothing to correct."""
    profile, raw = PositionProfile(), ProcessAcceptance()
    for seed, rate in enumerate([0.3, 0.95] * 20):
        simulate(profile, rate, [rate] * 4, rounds=100, seed=seed)
    rng = np.random.default_rng(1)
    examined, accepted = np.zeros(4), np.zeros(4)
    for rate in [0.3, 0.95] * 2000:
        n = 0
        while n < 4 and rng.random() < rate:
            n += 1
        examined[: min(n + 1, 4)] += 1
        accepted[:n] += 1
        raw.record("trunk", 4, n)
    naive = accepted / examined
    assert naive[3] - naive[0] > 0.2  # what a profile of raw fractions would have learned: +1.1 log-odds
    offsets = np.array(profile.offsets()[:4])
    assert np.abs(offsets).max() < 0.3 and abs(offsets.mean()) < 0.15  # sampling noise (a half-life of tokens)


def test_the_process_feeds_its_profiles_from_each_requests_proposals():
    process = ProcessAcceptance()
    assert process.offsets("trunk") == (0.0,) * POSITIONS and process.offsets("branch") == ()
    for _ in range(200):
        process.record("pool", 4, 0, expected_rate=0.5)  # the first pool token: always rejected
    assert process.offsets("pool")[0] < -1.0
    assert process.offsets("trunk") == (0.0,) * POSITIONS


@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=6),
    st.lists(st.floats(-4, 4), max_size=POSITIONS),
    st.integers(0, 12),
)
def test_reach_chances_are_probabilities_that_fall_with_depth(rates, offsets, length):
    reach = reach_chances(np.array(rates), tuple(offsets), length)
    assert reach.shape == (len(rates), length + 1)
    assert np.all(reach[:, 0] == 1.0) and np.all((reach >= 0) & (reach <= 1))
    assert np.all(np.diff(reach, axis=1) <= 1e-12)
    if not any(offsets):
        assert reach == pytest.approx(np.array(rates)[:, None] ** np.arange(length + 1))


# ---------------------------------------------------------------------------------------------- the planner

TARGET, DRAFT = LinearCost(0.2, 0.004), LinearCost(0.030, 0.002)  # batch 1 on the CPU, roughly
SHAPE = DraftShape(1.1, 6.0)


def outlook(rate: float, trunk: tuple[float, ...] = (), pool: tuple[float, ...] = ()) -> RowOutlook:
    return RowOutlook(4, rate, 0.4, 0.6, can_draft=True, trunk_offsets=trunk, pool_offsets=pool)


def test_deep_trunk_tokens_known_likelier_are_drafted():
    flat = plan_step([outlook(0.75)], TARGET, DRAFT, 4, shape=SHAPE)
    rising = plan_step([outlook(0.75, trunk=(0.0, 0.5, 1.0, 1.5))], TARGET, DRAFT, 4, shape=SHAPE)
    assert flat.rows[0].trunk < 4 and rising.rows[0].trunk == 4
    assert rising.expected_tokens > flat.expected_tokens


def test_a_pool_suffix_whose_first_token_is_seldom_right_is_not_proposed():
    flat = plan_step([outlook(0.3)], TARGET, DRAFT, 4, shape=SHAPE)
    doubtful = plan_step([outlook(0.3, pool=(-3.0, 0.0))], TARGET, DRAFT, 4, shape=SHAPE)
    assert flat.rows[0].total > flat.rows[0].trunk  # a pool suffix
    assert doubtful.rows[0].total == doubtful.rows[0].trunk
    gains = pool_gains(outlook(0.3, pool=(-3.0, 0.0)), 4)
    assert gains[1] < 0.05 and np.all(np.diff(gains) >= 0)


def test_a_catch_up_is_judged_with_the_profile_of_the_trunk():
    row = RowOutlook(4, 0.6, 0.0, 0.0, can_draft=True, catch_up=3000, untried=False, remaining=40)
    ratio = 1 / 0.3
    assert not catch_up_pays(row, ratio, 1, TARGET, DRAFT, 4)
    rising = RowOutlook(
        4, 0.6, 0.0, 0.0, can_draft=True, catch_up=3000, untried=False, remaining=40, trunk_offsets=(2.0, 2.5)
    )
    assert catch_up_pays(rising, ratio, 1, TARGET, DRAFT, 4)


def test_a_long_prompt_at_batch_1_is_caught_up_when_its_answer_pays_for_it_at_plain_decodings_yield():
    """Summarization at batch 1, as logged: an untried request with a 675-token prompt and 63 tokens to go. Its
    catch-up (1.6 s) saves about 6 s; priced at the speculative plan's yield (12.5 tokens/s) it looked unpaid."""
    from ouroboros_vllm.algorithm.planner import RowPlan, StepPlan
    from ouroboros_vllm.algorithm.step_plans import affordable_rows

    row = RowOutlook(4, 0.894, 0.0, 0.0, can_draft=True, catch_up=675, untried=True, remaining=63)
    target, draft, shape = LinearCost(0.1886, 0.0), LinearCost(0.0316, 0.0018), DraftShape(1.2, 4.48)
    plan = StepPlan([RowPlan(4, 4)], depth=4, forwards=4, expected_tokens=4.0, expected_seconds=0.32)
    declined = affordable_rows([row], plan, target, draft, 4, shape, catch_up_price=0.0024)
    assert not declined[0].can_draft  # the plan's yield: 12.5 tokens/s
    kept = affordable_rows([row], plan, target, draft, 4, shape, catch_up_price=0.0024, plain_yield=1 / 0.23)
    assert kept[0].can_draft
    short = replace(row, remaining=6)  # an answer about to end is still not worth the prompt
    assert not affordable_rows([short], plan, target, draft, 4, shape, None, 0.0024, 1 / 0.23)[0].can_draft


def test_a_calibration_starts_from_the_drafts_own_probability_and_learns_a_bins_error():
    calibration = ProbabilityCalibration()
    assert [calibration.chance(p) for p in (0.0, 0.33, 0.97, 1.0)] == [0.0, 0.33, 0.97, 1.0]
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.5, 0.6, 400)
    calibration.record(probs, rng.random(400) < probs - 0.3)  # an overconfident draft in this bin
    assert calibration.chance(0.55) == pytest.approx(0.25, abs=0.06)
    assert calibration.chance(0.85) == 0.85  # other bins untouched
    few = ProbabilityCalibration()
    few.record([0.9], [False])  # one token says little: shrunk toward the draft's own probability
    assert 0.8 < few.chance(0.92) < 0.92


@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), max_size=50), st.floats(0, 1))
def test_a_calibrated_chance_is_a_probability(verdicts, prob):
    calibration = ProbabilityCalibration()
    calibration.record([p for p, _ in verdicts], [ok for _, ok in verdicts])
    assert 0.0 <= calibration.chance(prob) <= 1.0


def test_old_verdicts_fade():
    calibration = ProbabilityCalibration()
    calibration.record([0.75] * 200, [False] * 200)
    wrong = calibration.chance(0.75)
    calibration.record([0.75] * 20000, [True, True, True, False] * 5000)  # the text changed: 75% right again
    assert wrong < 0.2 and calibration.chance(0.75) == pytest.approx(0.75, abs=0.03)
