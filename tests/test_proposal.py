"""Candidate suffixes from the pool, feedback bookkeeping by identity, and context N-grams."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.proposal import Proposal, apply_feedback, context_ngrams, lengthen, suffix_counts


def pool_of(*items, phrase_len=2):
    pool = PhrasePool(phrase_len, max_phrases_per_key=4, max_keys=100, max_phrases=1000)
    pool.insert_many(items)
    return pool


def test_lengthen_chains_newest_phrases_and_cuts_to_budget():
    pool = pool_of((9, (1, 2)), (9, (3, 4)), (4, (5, 6)), (6, (7, 8)))
    proposal = Proposal(tokens=[10, 9], trunk_len=2)
    lengthen(pool, proposal, context=[0], budget=7)
    # After 9 the newest phrase is (3, 4); after 4: (5, 6); after 6: (7, 8) cut to the budget.
    assert proposal.tokens == [10, 9, 3, 4, 5, 6, 7]
    assert [(u.key, u.phrase, u.offset) for u in proposal.suffixes] == [(9, (3, 4), 2), (4, (5, 6), 4), (6, (7, 8), 6)]


def test_lengthen_from_the_last_verified_token_when_there_is_no_trunk():
    proposal = Proposal()
    lengthen(pool_of((5, (1, 2))), proposal, context=[5], budget=4)
    assert proposal.tokens == [1, 2] and proposal.trunk_len == 0


def test_feedback_refines_the_used_suffix_by_identity_and_inspires_from_the_trunk():
    pool = pool_of((9, (1, 2)), (9, (3, 4)))
    proposal = Proposal(tokens=[7, 9], trunk_len=2)
    lengthen(pool, proposal, context=[0], budget=4)
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
    lengthen(pool, proposal, context=[0], budget=3)
    apply_feedback(pool, proposal, verified=[9], target_argmax=[9, 3])  # vLLM scheduled one token only
    assert pool.phrases(9) == [(3, 4)]


def test_a_phrase_that_matches_more_of_the_chain_wins_over_the_newest_under_the_last_token():
    # Under 1: (2, 3, 4) saw "1 2" before; the newest phrase under 2 is (5, 5, 5), which only shares the key.
    pool = pool_of((1, (2, 3, 4)), (1, (7, 8, 9)), (2, (5, 5, 5)), phrase_len=3)
    assert pool.match([0, 1, 2]) == (1, (2, 3, 4), 1)
    assert pool.match([0, 9, 2]) == (2, (5, 5, 5), 0)  # no longer match: the reference's choice
    assert pool.match([0, 9, 3]) is None
    assert (pool.counters.lookups, pool.counters.hits) == (3, 2)  # one counted lookup each
    proposal = Proposal()
    lengthen(pool, proposal, context=[0, 1, 2], budget=4)
    # (3, 4) after "1 2"; then the chain ends "2 3 4": no phrase under 2 starts "3 4", and neither 3 nor 4 is a
    # key: the proposal stops there.
    assert proposal.tokens == [3, 4]
    assert [(u.key, u.phrase, u.offset, u.matched) for u in proposal.suffixes] == [(1, (2, 3, 4), 0, 1)]


@given(
    st.lists(st.tuples(st.integers(0, 4), st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)))),
    st.lists(st.integers(0, 4), min_size=1, max_size=6),
)
def test_a_match_always_continues_the_chain_with_the_longest_match_there_is(items, context):
    pool = pool_of(*items, phrase_len=3)
    found = pool.match(context)
    stored = {(key, phrase) for key, phrases in pool.items() for phrase in phrases}

    def continues(matched, key, phrase):
        return key == context[-matched - 1] and phrase[:matched] == tuple(context[len(context) - matched :])

    longest = max(
        (m for m in range(min(3, len(context))) for key, phrase in stored if continues(m, key, phrase)), default=None
    )
    if longest is None:
        assert found is None
    else:
        key, phrase, matched = found
        assert (key, phrase) in stored and continues(matched, key, phrase) and matched == longest


def test_feedback_refines_a_context_matched_suffix_after_its_matched_tokens():
    pool = pool_of((1, (2, 3, 4)), phrase_len=3)
    proposal = Proposal()
    lengthen(pool, proposal, context=[1, 2], budget=2)
    assert proposal.tokens == [3, 4]
    # The target accepts 3, then says 6 where the phrase said 4: "1 2 3 6" replaces "1 2 3 4".
    apply_feedback(pool, proposal, verified=[3, 4], target_argmax=[3, 6, 0])
    assert pool.phrases(1) == [(2, 3, 6)]
    counts = suffix_counts(proposal, accepted_nodes=[0])
    assert (counts.matched_suffix_tokens, counts.matched_suffix_accepted_tokens) == (2, 1)
    assert counts.first_path_key_only_tokens == 0


@given(st.lists(st.integers(0, 5), max_size=20), st.integers(0, 20), st.integers(1, 4))
def test_context_ngrams_are_every_new_ngram(tokens, start, phrase_len):
    expected = [
        (tokens[k], tuple(tokens[k + 1 : k + 1 + phrase_len]))
        for k in range(len(tokens) - phrase_len)
        if k + phrase_len >= start
    ]
    assert context_ngrams(tokens, start, phrase_len) == expected
