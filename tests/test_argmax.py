"""The blocked argmax equals torch.argmax: first maxima, ties across and within blocks, a maximum in the last
(short) block, -inf and NaN rows, every size around the block boundaries."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ouroboros_vllm.runtime.argmax import BLOCK, argmax_last, runner_up


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.sampled_from([7, 4 * BLOCK - 1, 4 * BLOCK, 4 * BLOCK + 1, 5 * BLOCK + 384, 49152]),
    seed=st.integers(0, 1 << 30),
    ties=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1 << 20), st.integers(0, 1 << 20)), max_size=6),
    special=st.sampled_from(["none", "neg_inf_row", "nan", "tail_max", "coarse"]),
)
def test_blocked_argmax_equals_torch_argmax(rows, vocab, seed, ties, special):
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    if special == "coarse":  # few distinct values: ties everywhere
        x = x.round()
    for row, a, b in ties:  # two equal maxima in one row, anywhere
        if row < rows:
            top = float(x[row].max()) + 1
            x[row, a % vocab] = x[row, b % vocab] = top
    if special == "neg_inf_row":
        x[0] = float("-inf")
    elif special == "nan":
        x[rows - 1, seed % vocab] = float("nan")
    elif special == "tail_max":
        x[0, -1] = float(x[0].max()) + 1
    assert torch.equal(argmax_last(x), x.argmax(dim=-1))


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.sampled_from([5, 3000]), seed=st.integers(0, 1 << 30),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))  # fmt: skip
def test_the_runner_up_is_the_best_other_token_with_both_softmax_probabilities(rows, vocab, seed, dtype):
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4).to(dtype)
    best = argmax_last(logits)
    second, probs = runner_up(logits, best)
    masked = logits.clone()
    masked[torch.arange(rows), best] = float("-inf")
    assert torch.equal(second, masked.argmax(dim=-1))
    expected = logits.float().softmax(-1)
    assert probs.dtype == torch.float32 and probs.shape == (rows, 2)
    torch.testing.assert_close(probs[:, 0], expected.gather(-1, best[:, None])[:, 0])
    torch.testing.assert_close(probs[:, 1], expected.gather(-1, second[:, None])[:, 0])
