"""Whether a request's draft forwards carry the pool's phrases: the decision, and a request learning it from its rounds
(against the fake language model of test_drafting, no torch)."""

from __future__ import annotations

import numpy as np
import pytest
from test_drafting import VOCAB, FakeRuntime, greedy

from ouroboros_vllm.algorithm.cost_model import LinearCost
from ouroboros_vllm.algorithm.phrase_choice import PhraseJudge, PhraseYield, phrases_pay
from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.request import DraftModelInfo, DraftSettings, RequestState

# The draft's forward on this project's CPU (Qwen2.5-Coder 0.5B int8, batch 1, the benchmark's fit): 35 ms + 1.9 ms a
# token carried.
CPU_DRAFT = LinearCost(0.035, 0.0019)


def yield_of(tokens_per_forward: float, width: float, forwards: int = 100) -> PhraseYield:
    figures = PhraseYield()
    figures.record_request(round(tokens_per_forward * forwards), forwards, round(width * forwards))
    return figures


def test_phrases_ride_where_they_save_more_forwards_than_their_width_costs():
    process = PhraseYield()
    # HumanEval in the benchmark: 1.54 draft tokens a forward for about 7 phrase tokens: 29 ms a token against 37.
    assert phrases_pay(yield_of(1.54, 7), process, CPU_DRAFT)
    # MT-Bench: 1.08 tokens a forward for the same width: 45 ms a token.
    assert not phrases_pay(yield_of(1.08, 7), process, CPU_DRAFT)
    # A forward bound by reading the weights (a GPU's, nearly flat in its width): any saving pays.
    assert phrases_pay(yield_of(1.08, 7), process, LinearCost(0.003, 0.00001))
    # No phrase found (an empty pool): nothing to carry, and nothing gained by carrying it.
    assert not phrases_pay(yield_of(1.0, 0), process, CPU_DRAFT)


def test_rows_drafting_together_share_the_fixed_cost_so_a_row_s_phrases_must_save_more():
    figures = yield_of(1.54, 7)
    assert phrases_pay(figures, PhraseYield(), CPU_DRAFT, sharers=1)
    assert not phrases_pay(figures, PhraseYield(), CPU_DRAFT, sharers=8)


def test_a_new_request_starts_from_the_process_figures_and_its_own_rounds_take_over():
    process = yield_of(1.6, 7)
    request = PhraseYield()
    assert request.per_forward(process) == pytest.approx(process.per_forward())
    assert phrases_pay(request, process, CPU_DRAFT)
    for _ in range(12):  # rounds of 4 tokens in 4 forwards, 7 phrase tokens carried in each
        request.record_request(4, 4, 28)
    tokens, width = request.per_forward(process)
    assert tokens == pytest.approx(1.0, abs=0.1) and width == pytest.approx(7.0, abs=0.1)
    assert not phrases_pay(request, process, CPU_DRAFT)
    assert PhraseYield().per_forward() == (1.0, 0.0)  # nothing seen anywhere


def _request(pool: PhrasePool, process: PhraseYield) -> RequestState:
    settings = DraftSettings(gamma=6, phrase_len=3, draft_phrases=2, lookahead_window=0, uses_pool=True,
                             context_ngrams=False)  # fmt: skip
    return RequestState(settings, pool, phrases=PhraseJudge(process=process))


def _round(
    state: RequestState, runtime: FakeRuntime, history: list[int], price: LinearCost | None
) -> tuple[bool, list[int]]:
    """One round of 6 draft tokens after ``history``, run on the fake model: whether it carried the pool's phrases,
    and what it drafted."""
    info = DraftModelInfo(vocab_size=VOCAB, eos_token_ids=frozenset())
    round_ = state.start_round(np.asarray(history), 6, info, 6, phrase_price=price)
    assert round_ is not None
    runtime.draft([round_])
    carried = round_.carry_phrases
    tokens, counts = state.finish_round(round_, np.asarray(history), 6)
    assert counts.phrase_rounds == int(carried)
    return carried, tokens


def _right_phrases(history: list[int]) -> PhrasePool:
    """A pool holding the fake model's own continuations of ``history`` (every phrase matches the draft)."""
    full = history + greedy(history, 10)
    pool = PhrasePool(3, 16, 1000, 10000)
    pool.insert_many((full[i], tuple(full[i + 1 : i + 4])) for i in range(len(full) - 3))
    return pool


def _wrong_phrases() -> PhrasePool:
    """Two phrases of one repeated token under every key: now and then a token of the draft's continuation at best,
    never worth their width."""
    pool = PhrasePool(3, 16, 1000, 10000)
    for key in range(VOCAB):
        pool.insert_many([(key, ((key + 1) % VOCAB,) * 3), (key, ((key + 2) % VOCAB,) * 3)])
    return pool


def test_a_request_carries_phrases_while_they_match_and_stops_when_they_miss():
    history = [1, 2, 3, 4]
    process = PhraseYield()
    state, runtime = _request(_right_phrases(history), process), FakeRuntime()
    truth = greedy(history, 6)
    first = [_round(state, runtime, history, CPU_DRAFT) for _ in range(4)]
    assert not first[0][0] and first[-1][0]  # nothing known at first (no width, no saving): one token a forward
    state.pool = _wrong_phrases()
    later = [_round(state, runtime, history, CPU_DRAFT) for _ in range(8)]
    assert later[0][0] and not later[-1][0]
    assert all(tokens == truth for _, tokens in first + later)  # the draft's greedy continuation either way
    assert process.drafted.examined > 0  # every request's rounds teach the process's figures


def test_a_request_that_stopped_carrying_phrases_learns_from_its_narrow_rounds_when_they_would_pay():
    history = [1, 2, 3, 4]
    state, runtime = _request(_wrong_phrases(), PhraseYield()), FakeRuntime()
    narrow = [_round(state, runtime, history, CPU_DRAFT) for _ in range(6)]
    assert not any(carried for carried, _ in narrow)
    state.pool = _right_phrases(history)
    again = [_round(state, runtime, history, CPU_DRAFT) for _ in range(6)]
    assert not again[0][0] and again[-1][0]


def test_without_a_price_a_round_always_carries_phrases_and_replays_nothing():
    """The fixed modes (and cold requests): the paper's drafting, phrase by phrase, unjudged."""
    pool, process = PhrasePool(3, 16, 1000, 10000), PhraseYield()
    state, runtime = _request(pool, process), FakeRuntime()
    assert all(_round(state, runtime, [1, 2, 3, 4], None)[0] for _ in range(3))
    assert state.phrases.own.drafted.examined == 0 and process.drafted.examined == 0
