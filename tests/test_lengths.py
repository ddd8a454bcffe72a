"""What a running request is expected to still emit, from what finished requests emitted."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.cost_model import LinearCost
from ouroboros_vllm.algorithm.lengths import MIN_FINISHED, OutputLengths
from ouroboros_vllm.algorithm.planner import RowOutlook
from ouroboros_vllm.algorithm.request import RequestState
from ouroboros_vllm.algorithm.step_plans import catch_up_pays


@settings(max_examples=200, deadline=None)
@given(
    finished=st.lists(st.integers(0, 300), max_size=100),
    emitted=st.integers(0, 300),
    limit=st.one_of(st.none(), st.integers(0, 300)),
    window=st.integers(1, 64),
)
def test_the_expected_remaining_length_is_the_mean_residual_of_the_recent_requests_that_got_this_far(
    finished, emitted, limit, window
):
    lengths = OutputLengths(window)
    for length in finished:
        lengths.add(length)
    recent = finished[-window:]
    assert len(lengths) == len(recent)
    residuals = [length - emitted for length in recent if length > emitted]
    expected = sum(residuals) / len(residuals) if residuals else float(emitted)  # outlived them all: as long again
    if len(recent) < MIN_FINISHED:  # too few to go by
        expected = limit
    elif limit is not None:
        expected = min(expected, limit)
    assert lengths.expected_remaining(emitted, limit) == expected


def test_a_request_of_a_process_whose_answers_are_short_is_not_worth_a_catch_up():
    """Translation at batch 8: answers of 21-25 tokens under a max_tokens of 64. Priced over the 62 tokens the limit
    allows, the draft's catch-up on an 80-token prompt pays; over the ~21 the request is likely to emit, it does
    not (prices of this project's CPU at 8 rows: a plain step 0.25 s, 12.5 ms a verified token)."""
    target, draft = LinearCost(0.25, 0.0125), LinearCost(0.030, 0.0028)
    state = RequestState.__new__(RequestState)  # only its lengths are read
    state.max_tokens, state.emitted = 64, 2
    lengths = OutputLengths()
    assert state.expected_remaining(lengths) == 62  # nothing finished yet: the limit
    answers = (22, 24, 23, 21, 25, 22, 24, 23)
    for length in answers:
        lengths.add(length)
    assert state.expected_remaining(lengths) == sum(n - 2 for n in answers) / len(answers)

    def row(remaining: float | None) -> RowOutlook:
        return RowOutlook(4, 0.8, 0.0, 0.0, can_draft=True, catch_up=80, untried=True, remaining=remaining)

    ratio = 8 / target(8)
    assert catch_up_pays(row(state.remaining), ratio, 8, target, draft, 4)
    assert not catch_up_pays(row(state.expected_remaining(lengths)), ratio, 8, target, draft, 4)


def test_what_a_drafting_row_lacks_after_a_step_is_no_catch_up():
    """After a step, a row the draft drafted for lacks the tokens the target accepted and its own: its next round
    feeds them as every round does. Judged as a catch-up over a short expected answer they were declined, and the
    row never drafted again (MBPP at batch 8 after the engine's 8-token warm-up request: every row at 0 tokens)."""
    target, draft = LinearCost(0.25, 0.0125), LinearCost(0.030, 0.0028)
    ratio = 8 / target(8)

    def row(catch_up: int) -> RowOutlook:
        return RowOutlook(4, 0.9, 0.0, 0.0, can_draft=True, catch_up=catch_up, remaining=3.0)

    assert catch_up_pays(row(5), ratio, 8, target, draft, max_depth=4)  # 4 accepted + the target's own
    assert not catch_up_pays(row(40), ratio, 8, target, draft, max_depth=4)
