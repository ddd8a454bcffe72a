"""The draft's catch-ups start from the longest prompt prefix a cache row holds (runtime/prefix_sharing.py):
requests that arrive together, a finished request's row, a live request's row. On real and tiny models (float32),
packed and static forwards: drafts stay the draft model's greedy continuation, the cache equals a fresh prefill's,
and the first forward carries only the tokens no row held."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import real_model
from test_draft_runtime import assert_cache_equals_prefill, greedy_reference, load

from ouroboros_vllm.algorithm.drafting import DraftRound, DraftState
from ouroboros_vllm.runtime.draft_runtime import DraftRuntime
from ouroboros_vllm.runtime.prefix_sharing import MIN_SHARED


@pytest.fixture(scope="module", params=["tiny", "smollm2", "tiny-static"])
def runtime(request, tiny):
    path = tiny.target if request.param.startswith("tiny") else real_model("smollm2-135m-instruct")
    return load(path, static_shapes=request.param.endswith("static"))


def rounds_for(runtime: DraftRuntime, histories: list[list[int]], n: int = 4) -> list[DraftRound]:
    return [DraftRound(DraftState(), np.asarray(h), n, frozenset(), runtime.info.vocab_size) for h in histories]


def first_forward_tokens(runtime: DraftRuntime, rounds: list[DraftRound], reproducible: bool = False) -> int:
    return runtime.draft(rounds, reproducible=reproducible)[0][1]


def check(runtime: DraftRuntime, round_: DraftRound) -> None:
    history = round_.history.tolist()
    assert round_.drafted == greedy_reference(runtime, history, len(round_.drafted))
    assert_cache_equals_prefill(runtime, round_.state)


def test_requests_with_a_common_prefix_read_it_once(runtime):
    rng = random.Random(4)
    prefix = [rng.randrange(1000) for _ in range(40)]
    tails = [[rng.randrange(1000) for _ in range(n)] for n in (10, 12, 5)]
    rounds = rounds_for(runtime, [prefix + tail for tail in tails])
    # The planner's price of the three catch-ups: each is charged a third of the prefix, so they add up to what
    # the forward reads.
    priced = runtime.catch_ups([r.history for r in rounds], [0, 0, 0])
    assert priced == pytest.approx([len(tail) + 40 / 3 for tail in tails])
    # Arriving together: the first reads the prefix, the others copy it inside the same forward.
    assert first_forward_tokens(runtime, rounds) == 40 + sum(len(tail) for tail in tails)
    for round_ in rounds:
        check(runtime, round_)

    # A finished request's row keeps its tokens: the next request with that prefix takes the row, nothing copied.
    freed_row = rounds[0].state.cache_row
    runtime.release(rounds[0].state)
    later = rounds_for(runtime, [prefix + [rng.randrange(1000) for _ in range(8)]])
    assert runtime.shareable(later[0].history) == 40
    assert runtime.catch_ups([later[0].history], [0]) == [8.0]
    assert first_forward_tokens(runtime, later) == 8
    assert later[0].state.cache_row == freed_row
    check(runtime, later[0])

    # A live request's row: its slots are copied before the forward (here 52 tokens: the prefix and a tail).
    live = rounds[1].history.tolist()
    extended = rounds_for(runtime, [live + [rng.randrange(1000) for _ in range(6)]])
    assert first_forward_tokens(runtime, extended) == 6
    check(runtime, extended[0])

    # A reproducible (seeded) request reads its whole prompt: its drafts depend on its own forwards only.
    alone = rounds_for(runtime, [prefix + [7, 8, 9]])
    assert first_forward_tokens(runtime, alone, reproducible=True) == 43
    for state in [rounds[1].state, rounds[2].state, later[0].state, extended[0].state, alone[0].state]:
        runtime.release(state)


def test_a_short_common_prefix_is_read_again(tiny):
    runtime = load(tiny.target)
    rng = random.Random(6)
    prefix = [rng.randrange(1000) for _ in range(MIN_SHARED - 1)]
    rounds = rounds_for(runtime, [prefix + [rng.randrange(1000) for _ in range(20)] for _ in range(2)])
    histories = [r.history for r in rounds]
    assert runtime.catch_ups(histories, [0, 0]) == [float(len(h)) for h in histories]
    assert first_forward_tokens(runtime, rounds) == sum(len(h) for h in histories)


def test_sharing_can_be_turned_off(tiny):
    runtime = DraftRuntime(load(tiny.target).model, eos_token_ids=frozenset(), share_prefixes=False)
    prefix = list(range(100, 140))
    rounds = rounds_for(runtime, [prefix + [1, 2, 3], prefix + [4, 5]])
    assert first_forward_tokens(runtime, rounds) == 85
    assert runtime.shareable(np.asarray(prefix + [9])) == 0
    assert runtime.catch_ups([np.asarray(prefix + [9])] * 2, [0, 0]) == [41.0, 41.0]
