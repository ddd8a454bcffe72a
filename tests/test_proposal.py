"""Candidate suffixes from the pool, feedback bookkeeping by identity, and context N-grams."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.proposal import Proposal, apply_feedback, context_ngrams, lengthen


def pool_of(*items, phrase_len=2):
    pool = PhrasePool(phrase_len, max_phrases_per_key=4, max_keys=100, max_phrases=1000)
    pool.insert_many(items)
    return pool


def test_lengthen_chains_newest_phrases_and_cuts_to_budget():
    pool = pool_of((9, (1, 2)), (9, (3, 4)), (4, (5, 6)), (6, (7, 8)))
    proposal = Proposal(tokens=[10, 9], trunk_len=2)
    lengthen(pool, proposal, last_token=0, budget=7)
    # After 9 the newest phrase is (3, 4); after 4: (5, 6); after 6: (7, 8) cut to the budget.
    assert proposal.tokens == [10, 9, 3, 4, 5, 6, 7]
    assert [(u.key, u.phrase, u.offset) for u in proposal.suffixes] == [(9, (3, 4), 2), (4, (5, 6), 4), (6, (7, 8), 6)]


def test_lengthen_from_the_last_verified_token_when_there_is_no_trunk():
    proposal = Proposal()
    lengthen(pool_of((5, (1, 2))), proposal, last_token=5, budget=4)
    assert proposal.tokens == [1, 2] and proposal.trunk_len == 0


def test_feedback_refines_the_used_suffix_by_identity_and_inspires_from_the_trunk():
    pool = pool_of((9, (1, 2)), (9, (3, 4)))
    proposal = Proposal(tokens=[7, 9], trunk_len=2)
    lengthen(pool, proposal, last_token=0, budget=4)
    assert proposal.tokens == [7, 9, 3, 4]
    pool.insert(9, (5, 5))  # inserted after the proposal: refinement by position would hit this one
    # The target accepts 7 and 9, then predicts 3 after 9 and 8 after 3.
    apply_feedback(pool, proposal, verified=[7, 9, 3, 4], target_argmax=[7, 9, 3, 8, 0])
    assert pool.phrases(9) == [(1, 2), (5, 5), (3, 8)]


def test_feedback_inspiration_from_a_rejected_trunk():
    pool = pool_of(phrase_len=2)
    proposal = Proposal(tokens=[1, 2, 3], trunk_len=3)
    # The target rejects 1 (predicts 5); after 1 it would say 2 (= the draft), after 2 it says 3.
    apply_feedback(pool, proposal, verified=[1, 2, 3], target_argmax=[5, 2, 3, 4])
    assert pool.phrases(1) == [(2, 3)]
    assert pool.phrases(2) == [(3, 4)]


def test_feedback_ignores_a_suffix_vllm_did_not_verify():
    pool = pool_of((9, (3, 4)))
    proposal = Proposal(tokens=[9], trunk_len=1)
    lengthen(pool, proposal, last_token=0, budget=3)
    apply_feedback(pool, proposal, verified=[9], target_argmax=[9, 3])  # vLLM scheduled one token only
    assert pool.phrases(9) == [(3, 4)]


@given(st.lists(st.integers(0, 5), max_size=20), st.integers(0, 20), st.integers(1, 4))
def test_context_ngrams_are_every_new_ngram(tokens, start, phrase_len):
    expected = [
        (tokens[k], tuple(tokens[k + 1 : k + 1 + phrase_len]))
        for k in range(len(tokens) - phrase_len)
        if k + phrase_len >= start
    ]
    assert context_ngrams(tokens, start, phrase_len) == expected
