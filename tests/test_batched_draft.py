"""Batched drafting: rows that share each draft forward draft exactly what each would draft alone (float32)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import real_model
from test_phrase_drafting import greedy_reference, load

from ouroboros_vllm.batched_draft import batch_inputs
from ouroboros_vllm.draft_model import MAX_BATCHED_PENDING, DraftModel, DraftRow, DraftSequence, ForwardPlan
from ouroboros_vllm.masks import phrase_forward_layout


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def model(request, tiny):
    return load(tiny.target if request.param == "tiny" else real_model("smollm2-135m-instruct"))


def _plan(cached: int, pending: list[int], phrases: list[tuple[int, ...]]) -> ForwardPlan:
    phrase_len = len(phrases[0]) if phrases else 0
    mask, positions = phrase_forward_layout(cached, len(pending), len(phrases), phrase_len)
    ids = pending + [t for p in phrases for t in p]
    return ForwardPlan(cached, pending, phrases, None, 0, ids, mask[0, 0], positions[0], [len(pending) - 1])


def test_batch_inputs_open_each_rows_live_slots_and_its_own_tokens_only():
    a = _plan(3, [7], [(8, 9)])  # 3 context tokens in slots 0, 2, 4 (1 and 3 are holes)
    b = _plan(2, [5, 6], [])  # 2 context tokens in slots 1 and 3; one token narrower than a
    ids, positions, mask = batch_inputs([a, b], [[0, 2, 4], [1, 3]], cache_length=5)
    assert ids.tolist() == [[7, 8, 9], [5, 6, 0]]
    assert positions.tolist() == [[3, 4, 5], [2, 3, 0]]
    m = mask[:, 0].int().tolist()
    # row a: context slots 0, 2, 4; the phrase (8, 9) after the pending token, causal within itself
    assert m[0] == [[1, 0, 1, 0, 1, 1, 0, 0], [1, 0, 1, 0, 1, 1, 1, 0], [1, 0, 1, 0, 1, 1, 1, 1]]
    # row b: context slots 1, 3; its two pending tokens causal; the padding query sees only itself
    assert m[1] == [[0, 1, 0, 1, 0, 1, 0, 0], [0, 1, 0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1]]
    with pytest.raises(AssertionError, match="live slots"):
        batch_inputs([a], [[0, 1]], cache_length=5)


def _phrases_for(source: str, full: list[int], base: int):
    """Deterministic phrases (the same for the batched and the lone drafter): stretches of the true greedy
    continuation after the key ('oracle'), noise seeded by the key, or both ('mixed'); none for 'greedy'."""

    def phrases_for(key: int) -> list[tuple[int, ...]]:
        found = [tuple(full[i + 1 : i + 5]) for i in range(base - 1, len(full) - 4) if full[i] == key][:3]
        noise_rng = random.Random(key)
        noise = [tuple(noise_rng.randrange(1000) for _ in range(4)) for _ in range(2)]
        return {"greedy": [], "oracle": found, "mixed": noise[:1] + found[:2]}[source]

    return phrases_for


def _caches_equal(a: DraftSequence, b: DraftSequence) -> None:
    assert a.ids == b.ids
    for mine, theirs in zip(a.cache.layers, b.cache.layers, strict=True):
        assert mine.keys.shape == theirs.keys.shape == (1, *mine.keys.shape[1:])
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window_width", [0, 3])
@pytest.mark.parametrize("phrase_source", ["greedy", "oracle", "mixed"])
def test_rows_drafted_together_equal_each_row_drafted_alone(model, phrase_source, window_width):
    """Serving-like rounds for 4 requests of different lengths and budgets (rows leave the shared forward at
    different steps): a one-token prompt (drafts alone until it has a cache), short prompts, a prompt longer
    than MAX_BATCHED_PENDING (prefilled alone); after each round the 'target' keeps a random prefix."""
    rng = random.Random(5)
    histories = [[rng.randrange(1000) for _ in range(n)] for n in (1, 5, 12, MAX_BATCHED_PENDING + 14)]
    budgets = [6, 3, 8, 5]
    together = [DraftSequence() for _ in histories]
    alone = [DraftSequence() for _ in histories]
    joined = 0
    for _ in range(4):
        rows, expected, ngrams_alone = [], [], []
        ngrams_together: list[list] = [[] for _ in histories]
        for i, history in enumerate(histories):
            full = history + greedy_reference(model, history, 10)
            phrases_for = _phrases_for(phrase_source, full, len(history))
            found: list = []
            expected.append(model.phrase_draft(alone[i], np.asarray(history), budgets[i], phrases_for,
                                               window_shape=(4, window_width), add_ngrams=found.extend))
            ngrams_alone.append(found)
            assert expected[-1][0] == full[len(history) : len(history) + budgets[i]]  # float32: exact greedy
            rows.append(DraftRow(together[i], np.asarray(history), budgets[i], phrases_for=phrases_for,
                                 window_shape=(4, window_width), add_ngrams=ngrams_together[i].extend))
        joined += sum(seq.cache is not None for seq in together)
        model.draft_rows(rows)
        for i, row in enumerate(rows):
            assert (row.drafted, row.forwards) == expected[i]
            assert ngrams_together[i] == ngrams_alone[i]
            _caches_equal(row.seq, alone[i])
        for i, history in enumerate(histories):
            keep = rng.randrange(0, budgets[i] + 1)
            histories[i] = history + rows[i].drafted[:keep] + [rng.randrange(1000)]
    assert joined >= 10  # most rows drafted in the shared forward


def test_a_row_that_reaches_eos_leaves_the_batch_early(tiny):
    model = load(tiny.target)
    rng = random.Random(9)
    histories = [[rng.randrange(1000) for _ in range(8)] for _ in range(3)]
    truths = [greedy_reference(model, h, 6) for h in histories]
    eos = truths[0][1]
    lone = DraftModel(model.model, eos_token_ids={eos})
    expected = [lone.phrase_draft(DraftSequence(), np.asarray(h), 6, lambda key: []) for h in histories]
    rows = [DraftRow(DraftSequence(), np.asarray(h), 6) for h in histories]
    for row in rows:  # give each row a cache first, so that all three share the forward
        lone._forward(row.seq, row.history[:-1].tolist())
    lone.draft_rows(rows)
    assert [(row.drafted, row.forwards) for row in rows] == expected
    assert rows[0].drafted[-1] == eos and len(rows[0].drafted) <= 2  # stopped at EOS; the others went on
    assert max(len(row.drafted) for row in rows) > 2
