"""Phrase-by-phrase drafting: the custom-mask forward is exact, and the drafter equals plain greedy."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import real_model

from ouroboros_vllm.draft_model import DraftModel, DraftModelError, DraftSequence, quantize_int8, resolve_precision
from ouroboros_vllm.masks import phrase_forward_layout


def load(path, int8: bool = False) -> DraftModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return DraftModel(quantize_int8(model) if int8 else model, eos_token_ids=set())


# Exact drafting is a property of the float dtypes (int8 scales activations per forward, see quantize_int8).
@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def model(request, tiny):
    return load(tiny.target if request.param == "tiny" else real_model("smollm2-135m-instruct"))


def test_precision_auto_is_int8_on_cpu_and_the_target_dtype_elsewhere():
    assert resolve_precision("auto", torch.float32, torch.device("cpu")) == "int8"
    assert resolve_precision("auto", torch.bfloat16, torch.device("cuda")) == "bfloat16"
    assert resolve_precision("float32", torch.bfloat16, torch.device("cpu")) == "float32"
    with pytest.raises(DraftModelError, match='"int8" runs on CPU only'):
        resolve_precision("int8", torch.float16, torch.device("cuda"))


def test_int8_quantizes_every_linear_layer(tiny):
    model = load(tiny.target, int8=True).model
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert any(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in model.modules())


@torch.inference_mode()
def test_phrase_logits_equal_separate_plain_forwards(model):
    rng = random.Random(0)
    vocab = 1000
    context = [rng.randrange(vocab) for _ in range(20)]
    pending = [rng.randrange(vocab) for _ in range(3)]
    phrases = [tuple(rng.randrange(vocab) for _ in range(4)) for _ in range(3)]
    seq = DraftSequence()
    model._forward(seq, context)
    mask, positions = phrase_forward_layout(len(context), len(pending), len(phrases), 4)
    flat = pending + [t for p in phrases for t in p]
    wide = model.model(input_ids=torch.tensor([flat]), position_ids=positions, attention_mask=mask,
                       past_key_values=seq.cache, use_cache=True).logits[0]
    for j, phrase in enumerate(phrases):
        plain = model.model(input_ids=torch.tensor([context + pending + list(phrase)])).logits[0]
        torch.testing.assert_close(wide[3 + 4 * j : 3 + 4 * (j + 1)], plain[-4:], atol=2e-4, rtol=1e-4)
    plain = model.model(input_ids=torch.tensor([context + pending])).logits[0]
    torch.testing.assert_close(wide[:3], plain[-3:], atol=2e-4, rtol=1e-4)


@torch.inference_mode()
def test_window_and_phrase_logits_equal_separate_plain_forwards(model):
    """Each lookahead-window token sees exactly its trajectory: level 0 before its column, then its column's
    levels 1..l (see ouroboros_vllm.masks); phrases beside the window see neither it nor each other."""
    rng = random.Random(2)
    vocab = 1000
    context = [rng.randrange(vocab) for _ in range(16)]
    pending = [rng.randrange(vocab) for _ in range(2)]
    levels, width = 3, 4
    window = [[rng.randrange(vocab) for _ in range(width)] for _ in range(levels)]
    phrases = [tuple(rng.randrange(vocab) for _ in range(3)) for _ in range(2)]
    seq = DraftSequence()
    model._forward(seq, context)
    mask, positions = phrase_forward_layout(len(context), len(pending), len(phrases), 3,
                                            window_levels=levels, window_width=width)
    flat = pending + [t for level in window for t in level] + [t for p in phrases for t in p]
    wide = model.model(input_ids=torch.tensor([flat]), position_ids=positions, attention_mask=mask,
                       past_key_values=seq.cache, use_cache=True).logits[0]
    for level in range(levels):
        for column in range(width):
            trajectory = window[0][: column + 1] if level == 0 else (
                window[0][:column] + [window[lv][column] for lv in range(1, level + 1)])
            plain = model.model(input_ids=torch.tensor([context + pending + trajectory])).logits[0, -1]
            torch.testing.assert_close(wide[2 + level * width + column], plain, atol=2e-4, rtol=1e-4)
    first_phrase = 2 + levels * width
    for j, phrase in enumerate(phrases):
        plain = model.model(input_ids=torch.tensor([context + pending + list(phrase)])).logits[0]
        torch.testing.assert_close(wide[first_phrase + 3 * j : first_phrase + 3 * (j + 1)], plain[-3:],
                                   atol=2e-4, rtol=1e-4)


def greedy_reference(model: DraftModel, history: list[int], n: int) -> list[int]:
    return model.greedy(DraftSequence(), np.asarray(history), n)


@pytest.mark.parametrize("window_width", [0, 3])
@pytest.mark.parametrize("phrase_source", ["oracle", "random", "mixed"])
def test_phrase_drafting_equals_plain_greedy_over_rounds(model, phrase_source, window_width):
    """Rounds as in serving: draft, the 'target' keeps a prefix and adds a token of its own, draft again."""
    rng = random.Random(1)
    history = [rng.randrange(1000) for _ in range(12)]
    seq = DraftSequence()
    ngrams = []
    total_forwards = total_tokens = 0
    for _ in range(4):
        truth = greedy_reference(model, history, 10)

        def phrases_for(key, truth=truth, base=len(history)):
            # Oracle phrases: stretches of the true greedy continuation after an occurrence of the key.
            full = history + truth
            found = [tuple(full[i + 1 : i + 5]) for i in range(base - 1, len(full) - 4) if full[i] == key]
            noise = [tuple(rng.randrange(1000) for _ in range(4)) for _ in range(2)]
            return {"oracle": found[:3], "random": noise, "mixed": noise[:1] + found[:2]}[phrase_source]

        drafted, forwards = model.phrase_draft(seq, np.asarray(history), 8, phrases_for,
                                               window_shape=(4, window_width), add_ngrams=ngrams.extend)
        assert drafted == truth[:8]
        total_forwards += forwards
        total_tokens += len(drafted)
        keep = rng.randrange(0, 8)
        history = history + drafted[:keep] + [rng.randrange(1000)]
    if phrase_source != "random":
        assert total_tokens > total_forwards, "phrases never saved a forward"
    # The window completes one N-gram per column per forward.
    assert len(ngrams) == window_width * total_forwards
    assert all(len(phrase) == 4 for _, phrase in ngrams)
