"""The static-shape draft forward (the grid CUDA graphs replay): its buckets, and drafts equal to the packed
forward's where rows of every kind share a forward: a prompt's catch-up (packed), drafting rows (grid), padding
rows, across a cache that grows. The exactness tests of tests/test_draft_runtime.py also run on the grid."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_draft_runtime import _oracle_phrases, load

from ouroboros_vllm.algorithm.drafting import DraftRound, DraftState
from ouroboros_vllm.runtime.static_forward import MAX_STATIC_WIDTH, bucket


@given(st.integers(0, 5000), st.integers(0, 512))
def test_bucket_is_the_least_power_of_two_that_fits(n, least):
    size = bucket(n, least)
    assert size & (size - 1) == 0 and size >= max(n, least, 1)
    assert size == 1 or size // 2 < max(n, least)


def _rounds(runtime, states, histories, budgets, phrase_fns):
    return [
        DraftRound(state, np.asarray(h), n, frozenset(), runtime.info.vocab_size, phrases_for=fn, window_shape=(4, 2))
        for state, h, n, fn in zip(states, histories, budgets, phrase_fns, strict=True)
    ]


def test_grid_drafts_equal_packed_drafts_with_catch_ups_padding_rows_and_cache_growth(tiny):
    """Rounds of 5 requests (grid rows padded to 8) in shared forwards; a new long prompt joins in later rounds,
    so a forward mixes its catch-up (wider than the grid takes) with drafting rows, the cache grows past its first
    rows and slots (the grid's buffers then point at new storage), and every draft and cache row equals the packed
    runtime's."""
    packed, grid = load(tiny.target), load(tiny.target, static_shapes=True)
    assert grid.static is not None
    rng = random.Random(11)
    histories = [[rng.randrange(1000) for _ in range(n)] for n in (3, 9, 20, 33, 50)]
    storage_before = grid.cache.storage
    states = {name: [DraftState() for _ in histories] for name in ("packed", "grid")}
    for step in range(5):
        if step in (2, 3):  # a long prompt arrives: its catch-up is a packed forward beside the grid's rows
            histories.append([rng.randrange(1000) for _ in range(200 + 100 * step)])
            for name in states:
                states[name].append(DraftState())
        budgets = [rng.randrange(1, 9) for _ in histories]
        phrase_fns = [_oracle_phrases(h, [], "mixed", rng) for h in histories]  # phrases from the history, noise
        drafted, probs = {}, {}
        for name, runtime in (("packed", packed), ("grid", grid)):
            rounds = _rounds(runtime, states[name], histories, budgets, phrase_fns)
            runtime.draft(rounds, wide=True)
            drafted[name] = [(r.drafted, r.forwards, r.runner_ups) for r in rounds]
            probs[name] = [r.head_probs for r in rounds]
        assert drafted["grid"] == drafted["packed"]
        for mine, theirs in zip(probs["grid"], probs["packed"], strict=True):
            assert mine.keys() == theirs.keys()
            for index, pair in mine.items():
                assert pair == pytest.approx(theirs[index], abs=1e-4)
        for mine, theirs in zip(states["grid"], states["packed"], strict=True):
            assert mine.ids == theirs.ids
            n = len(mine.ids)
            torch.testing.assert_close(
                grid.cache.storage[:, :, mine.cache_row, :, :n],
                packed.cache.storage[:, :, theirs.cache_row, :, :n],
                atol=1e-4,
                rtol=1e-4,
            )
        for i, h in enumerate(histories):
            keep = rng.randrange(0, budgets[i] + 1)
            histories[i] = h + drafted["packed"][i][0][:keep] + [rng.randrange(1000)]
    assert grid.cache.storage is not storage_before and grid.cache.capacity >= 512
    assert max(len(h) for h in histories) > MAX_STATIC_WIDTH


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_draft_what_the_grid_drafts_without_graphs(tiny):
    """On a GPU: each bucket's captured graph, replayed, drafts what the same grid drafts run eagerly."""
    from transformers import AutoModelForCausalLM

    from ouroboros_vllm.runtime.draft_runtime import DraftRuntime

    model = AutoModelForCausalLM.from_pretrained(str(tiny.target), dtype=torch.float32).to("cuda").eval()
    graphs, eager = DraftRuntime(model, frozenset(), True), DraftRuntime(model, frozenset(), True)
    assert graphs.static is not None and eager.static is not None and graphs.static.use_graphs
    eager.static.use_graphs = False
    rng = random.Random(4)
    histories = [[rng.randrange(1000) for _ in range(n)] for n in (5, 17, 40)]
    states = {id(graphs): [DraftState() for _ in histories], id(eager): [DraftState() for _ in histories]}
    for _ in range(4):
        budgets = [rng.randrange(1, 9) for _ in histories]
        phrase_fns = [_oracle_phrases(h, [], "random", rng) for h in histories]
        drafted = []
        for runtime in (graphs, eager):
            rounds = _rounds(runtime, states[id(runtime)], histories, budgets, phrase_fns)
            runtime.draft(rounds, wide=True)
            drafted.append([r.drafted for r in rounds])
        assert drafted[0] == drafted[1]
        histories = [h + d[:1] + [rng.randrange(1000)] for h, d in zip(histories, drafted[0], strict=True)]
    assert graphs.static._graphs  # something was captured and replayed
