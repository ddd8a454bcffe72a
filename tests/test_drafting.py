"""Drafting phrase by phrase, as pure bookkeeping, against a fake language model (no torch).

The fake model predicts the next token from the tokens a query actually sees (its row's cached slots and the
new tokens its mask opens, in position order), so a mask that lets a phrase see another phrase, a wrong
position, or a cache slot left in the wrong place changes its predictions. A fake runtime keeps each row's
cache as a list of (token, position) slots and compacts it as the real one does.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.drafting import DraftRound, DraftState, ForwardPlan, common_prefix_length
from ouroboros_vllm.algorithm.layout import forward_layout

VOCAB = 7  # small, so that phrases often match


def next_token(seen: list[int]) -> int:
    """The fake model's greedy token after ``seen`` (depends on the last three tokens and the length)."""
    tail = seen[-3:]
    return (sum((i + 2) * t for i, t in enumerate(tail)) + len(seen)) % VOCAB


def greedy(history: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(next_token(history + out))
    return out


class FakeRuntime:
    """Rows of (token, position) slots; each forward's argmax from what each query sees."""

    def __init__(self) -> None:
        self.rows: dict[int, list[tuple[int, int]]] = {}

    def draft(self, rounds: list[DraftRound]) -> None:
        active = [r for r in rounds if not r.done]
        while active:
            plans = [r.plan() for r in active]
            for r, plan in zip(active, plans, strict=True):
                kept = r.finish(plan, self._forward(r.state, plan))
                slots = self.rows[r.state.cache_row]
                new = slots[plan.cached :]
                self.rows[r.state.cache_row] = slots[: plan.cached] + [new[k] for k in kept]
            active = [r for r in active if not r.done]

    def _forward(self, state: DraftState, plan: ForwardPlan) -> dict[int, int]:
        if state.cache_row is None:
            state.cache_row = len(self.rows)
            self.rows[state.cache_row] = []
        slots = self.rows[state.cache_row][: plan.cached]  # a rejected tail is simply overwritten
        assert [position for _, position in slots] == list(range(plan.cached)), "a cache slot is out of place"
        new = list(zip(plan.input_ids, plan.positions.tolist(), strict=True))
        self.rows[state.cache_row] = slots + new
        argmax = {}
        rows = plan.logit_rows + [i for i in range(plan.num_new) if i not in plan.logit_rows]
        for i in rows:
            seen = slots + [new[j] for j in range(plan.num_new) if plan.mask[i, j]]
            positions = [p for _, p in seen]
            assert positions == list(range(len(seen))), f"query {i} sees positions {positions}"
            argmax[i] = next_token([t for t, _ in seen])
        return argmax


token = st.integers(0, VOCAB - 1)


@settings(max_examples=60, deadline=None)
@given(
    history=st.lists(token, min_size=1, max_size=12),
    rounds=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6), st.integers(0, VOCAB - 1)), min_size=1, max_size=4),
    noise=st.lists(st.lists(token, min_size=3, max_size=3), max_size=3),
    window=st.sampled_from([(0, 0), (4, 2), (3, 3)]),
)
def test_drafting_equals_greedy_and_the_cache_holds_exactly_the_ids(history, rounds, noise, window):
    """Over serving-like rounds (draft; the target keeps a prefix and adds a token), with phrases that are right,
    partly right or noise: the draft is the model's greedy continuation, and the cache's slots hold exactly
    ``state.ids`` at positions 0.. after every round."""
    runtime = FakeRuntime()
    state = DraftState()
    for budget, keep, extra in rounds:
        truth = greedy(history, budget + 3)

        def phrases_for(key, truth=truth):
            right = [tuple(truth[i + 1 : i + 4]) for i in range(len(truth) - 3) if truth[i] == key]
            return [tuple(p) for p in noise[:1]] + right[:2] + [tuple(p) for p in noise[1:]]

        round_ = DraftRound(
            state, np.asarray(history), budget, frozenset(), VOCAB, phrases_for=phrases_for, window_shape=window
        )
        runtime.draft([round_])
        assert round_.drafted == truth[:budget]
        assert [t for t, _ in runtime.rows[state.cache_row][: len(state.ids)]] == state.ids
        history = history + round_.drafted[:keep] + [extra]


def test_a_matched_phrase_emits_several_tokens_per_forward():
    history = [1, 2, 3]
    truth = greedy(history, 6)
    round_ = DraftRound(
        DraftState(),
        np.asarray(history),
        6,
        frozenset(),
        VOCAB,
        phrases_for=lambda key: [tuple(truth[0:3])] if key == history[-1] else [],
    )
    FakeRuntime().draft([round_])
    assert round_.drafted == truth
    assert round_.forwards < 6


def test_only_phrases_that_start_with_the_next_token_need_their_argmax():
    mask, offsets = forward_layout(1, 3, 2)
    plan = ForwardPlan(
        cached=5,
        pending=[9],
        phrases=[(4, 1), (3, 3), (4, 2)],
        window_tokens=[],
        input_ids=[9, 4, 1, 3, 3, 4, 2],
        mask=mask,
        positions=offsets + 5,
        logit_rows=[0],
    )
    assert plan.phrase_rows(4) == [1, 2, 5, 6]
    assert plan.phrase_rows(3) == [3, 4]
    assert plan.phrase_rows(8) == []


def test_layout_of_pending_tokens_and_phrases():
    mask, offsets = forward_layout(2, 2, 2)
    assert offsets.tolist() == [0, 1, 2, 3, 2, 3]
    assert mask.astype(int).tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ]


@given(st.lists(token, max_size=8), st.lists(token, min_size=1, max_size=8))
def test_rewind_keeps_the_common_prefix_and_feeds_at_least_the_last_token(cached, history):
    state = DraftState(ids=list(cached))
    pending = state.rewind_to(np.asarray(history))
    keep = min(common_prefix_length(cached, np.asarray(history)), len(history) - 1)
    assert state.ids == cached[:keep] and pending == history[keep:] and pending


@settings(max_examples=40, deadline=None)
@given(history=st.lists(token, min_size=2, max_size=12), budget=st.integers(1, 8), wide=st.booleans())
def test_phrase_tails_keep_drafting_exact_and_narrow_the_forwards(history, budget, wide):
    """Tails (phrases under the token before the key that start with the key, first token dropped): the draft is
    still the model's greedy continuation; without tails and not wide, a forward carries no phrases at all."""
    from ouroboros_vllm.algorithm.pool import PhrasePool

    truth = greedy(history, budget + 4)
    full = history + truth
    pool = PhrasePool(3, 16, 1000, 10000)
    pool.insert_many((full[i], tuple(full[i + 1 : i + 4])) for i in range(len(full) - 3))
    runtime = FakeRuntime()
    lengths: set[int] = set()
    round_ = DraftRound(DraftState(), np.asarray(history), budget, frozenset(), VOCAB,
                        phrases_for=lambda key: pool.newest(key, 2),
                        tails_for=lambda previous, key: pool.tails(previous, key, 2))  # fmt: skip
    while not round_.done:
        plan = round_.plan(wide)
        lengths |= {len(phrase) for phrase in plan.phrases}
        kept = round_.finish(plan, runtime._forward(round_.state, plan))
        slots = runtime.rows[round_.state.cache_row]
        runtime.rows[round_.state.cache_row] = slots[: plan.cached] + [slots[plan.cached + k] for k in kept]
    assert round_.drafted == truth[:budget]
    assert lengths <= ({2, 3} if wide else {2})  # tails are one token shorter than phrases


def test_a_round_told_to_stop_early_stops_after_that_forward():
    runtime = FakeRuntime()
    history = [1, 2, 3]
    round_ = DraftRound(DraftState(), np.asarray(history), 6, frozenset(), VOCAB)
    round_.stop_early = lambda r: len(r.drafted) >= 2
    runtime.draft([round_])
    assert round_.drafted == greedy(history, 2) and round_.forwards == 2 and round_.done


@settings(max_examples=60, deadline=None)
@given(
    history=st.lists(token, min_size=1, max_size=12),
    budget=st.integers(1, 8),
    noise=st.lists(st.lists(token, min_size=4, max_size=4), max_size=4),
    right=st.integers(0, 4),
)
def test_phrase_replay_is_what_a_carrying_round_did_and_a_narrow_round_drafts_the_same(history, budget, noise, right):
    """A round's replay (forwards, phrase tokens) equals what its forwards did when it carried the pool's phrases and
    tails; a round told not to carry them drafts the same tokens one per forward, carrying none, and replays to
    the carrying round's figures."""
    from ouroboros_vllm.algorithm.pool import PhrasePool

    truth = greedy(history, budget + 4)
    full = history + truth
    pool = PhrasePool(3, 16, 1000, 10000)
    pool.insert_many((key, tuple(phrase)) for key, *phrase in noise)
    pool.insert_many((full[i], tuple(full[i + 1 : i + 4])) for i in range(len(history) - 1, len(full) - 3)[:right])

    def drafted(carry: bool) -> tuple[DraftRound, int, int]:
        runtime, carried, forwards = FakeRuntime(), 0, 0
        round_ = DraftRound(DraftState(), np.asarray(history), budget, frozenset(), VOCAB,
                            phrases_for=lambda key: pool.newest(key, 2),
                            tails_for=lambda previous, key: pool.tails(previous, key, 2),
                            carry_phrases=carry)  # fmt: skip
        while not round_.done:
            plan = round_.plan()
            carried, forwards = carried + len(plan.phrases) * len(plan.phrases[0] if plan.phrases else ()), forwards + 1
            kept = round_.finish(plan, runtime._forward(round_.state, plan))
            slots = runtime.rows[round_.state.cache_row]
            runtime.rows[round_.state.cache_row] = slots[: plan.cached] + [slots[plan.cached + k] for k in kept]
        return round_, forwards, carried

    wide, wide_forwards, wide_carried = drafted(True)
    narrow, narrow_forwards, narrow_carried = drafted(False)
    assert wide.drafted == narrow.drafted == truth[:budget]
    assert wide.phrase_replay() == (wide_forwards, wide_carried)
    assert (narrow_forwards, narrow_carried) == (budget, 0)
    assert narrow.phrase_replay() == (wide_forwards, wide_carried)
