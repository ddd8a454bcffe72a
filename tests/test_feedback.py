"""Inspiration and refinement on scripted verification results, against the algorithm doc's definition."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.feedback import first_mismatch, inspiration, refinement


def test_all_accepted_harvests_nothing():
    assert inspiration([1, 2, 3], [1, 2, 3, 4], phrase_len=2) == []


def test_scripted_rejection():
    # draft:   10 11 12 13 14        the target rejects 11 (it predicted 21)
    # argmax:  10 21 22 13 24 25     argmax[j] follows draft[:j]
    draft = [10, 11, 12, 13, 14]
    argmax = [10, 21, 22, 13, 24, 25]
    assert first_mismatch(draft, argmax) == 1
    # k=1 key 11: 22, then draft[2]=12 != 22 -> stop at length 1: dropped.
    # k=2 key 12: 13, draft[3]=13 == 13 -> go on: 24 -> (13, 24) full.
    # k=3 key 13: 24, draft[4]=14 != 24 -> stop: dropped.
    # k=4 key 14: 25 (the trunk's end), length 1: dropped.
    assert inspiration(draft, argmax, phrase_len=2) == [(12, (13, 24))]
    assert inspiration(draft, argmax, phrase_len=1) == [(11, (22,)), (12, (13,)), (13, (24,)), (14, (25,))]


def test_phrase_ends_at_the_trunk_end_prediction():
    draft = [5, 6, 7]
    argmax = [9, 6, 7, 8]  # first token rejected; the rest agree with the target's predictions
    assert inspiration(draft, argmax, phrase_len=3) == [(5, (6, 7, 8))]


def test_inspiration_needs_one_prediction_per_position_plus_one():
    with pytest.raises(ValueError, match="need len\\(draft\\) \\+ 1 = 3 target predictions, got 2"):
        inspiration([1, 2], [1, 2], phrase_len=2)


def spec_inspiration(draft, argmax, phrase_len):
    """The doc's rule, written independently: a phrase from k is the longest run a[k+1..] such that each
    token after the first is preceded by a draft token equal to the target's previous prediction."""
    i = next((j for j, t in enumerate(draft) if t != argmax[j]), len(draft))
    found = []
    for k in range(i, len(draft)):
        length = 1
        while k + length <= len(draft) - 1 and draft[k + length] == argmax[k + length] and length < phrase_len:
            length += 1
        if length >= phrase_len and k + phrase_len <= len(draft):
            found.append((draft[k], tuple(argmax[k + 1 : k + 1 + phrase_len])))
    return found


@given(st.data(), st.integers(1, 8), st.integers(1, 4))
def test_matches_an_independent_statement_of_the_rule(data, m, phrase_len):
    draft = data.draw(st.lists(st.integers(0, 2), min_size=m, max_size=m))
    argmax = data.draw(st.lists(st.integers(0, 2), min_size=m + 1, max_size=m + 1))
    assert inspiration(draft, argmax, phrase_len) == spec_inspiration(draft, argmax, phrase_len)


def test_refinement_takes_the_target_continuation_of_the_branch():
    # key K at the trunk end; suffix (1, 2, 3); the target predicted 1 after K, then 2 after 1, then 9 after 2.
    assert refinement([1, 2, 9, 4], phrase_len=3) == (1, 2, 9)
    assert refinement([1, 2], phrase_len=3) is None
