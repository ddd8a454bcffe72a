"""The draft runtime on real models (float32): its packed forward over the persistent cache is exact, phrase
drafting equals plain greedy decoding, rows drafted together equal each row alone, and the cache left behind
equals a fresh prefill's."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import real_model

from ouroboros_vllm.algorithm.drafting import DraftRound, DraftState, ForwardPlan
from ouroboros_vllm.algorithm.layout import forward_layout
from ouroboros_vllm.runtime.draft_runtime import DraftRuntime
from ouroboros_vllm.runtime.loading import DraftModelError, quantize_int8, resolve_precision


def load(path, int8: bool = False, eos: frozenset[int] = frozenset(), static_shapes: bool = False) -> DraftRuntime:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return DraftRuntime(quantize_int8(model) if int8 else model, eos_token_ids=eos, static_shapes=static_shapes)


# Exact drafting is a property of the float dtypes (int8 scales activations per forward, see quantize_int8).
# Every test of the runtime runs on both forwards: packed, and the static grid (CUDA graphs' shapes; on CPU the
# graph step is skipped, the grid and its buffers are the same).
@pytest.fixture(scope="module", params=["tiny", "smollm2", "tiny-static", "smollm2-static"])
def runtime(request, tiny):
    path = tiny.target if request.param.startswith("tiny") else real_model("smollm2-135m-instruct")
    return load(path, static_shapes=request.param.endswith("static"))


@torch.inference_mode()
def plain_logits(runtime: DraftRuntime, tokens: list[int]) -> torch.Tensor:
    """Logits of a plain transformers forward over ``tokens`` (no cache of ours: the model's own SDPA path)."""
    return runtime.model(input_ids=torch.tensor([tokens])).logits[0]


def greedy_reference(runtime: DraftRuntime, history: list[int], n: int) -> list[int]:
    """The draft model's greedy continuation, one full forward per token."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(plain_logits(runtime, history + out)[-1].argmax()))
    return out


def draft(
    runtime: DraftRuntime,
    state: DraftState,
    history: list[int],
    n: int,
    phrases_for=lambda key: (),
    window_shape=(0, 0),
    ngrams: list | None = None,
) -> DraftRound:
    round_ = DraftRound(
        state,
        np.asarray(history),
        n,
        runtime.info.eos_token_ids,
        runtime.info.vocab_size,
        phrases_for=phrases_for,
        window_shape=window_shape,
        add_ngrams=None if ngrams is None else ngrams.extend,
    )
    runtime.draft([round_])
    return round_


def prefilled(runtime: DraftRuntime, tokens: list[int]) -> DraftState:
    """A request whose cache row holds ``tokens``, from one plain causal forward."""
    state = DraftState()
    round_ = DraftRound(state, np.asarray(tokens + [0]), 1, frozenset(), runtime.info.vocab_size)
    runtime.forward([(state, round_.plan())])  # feeds `tokens` and one more, which the next forward overwrites
    state.ids = list(tokens)
    return state


def assert_cache_equals_prefill(runtime: DraftRuntime, state: DraftState) -> None:
    """The row's keys and values for ``state.ids`` equal those a fresh forward over ``state.ids`` computes."""
    fresh = prefilled(runtime, state.ids)
    n = len(state.ids)
    mine = runtime.cache.storage[:, :, state.cache_row, :, :n]
    theirs = runtime.cache.storage[:, :, fresh.cache_row, :, :n]
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    runtime.release(fresh)


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
def test_packed_forward_logits_equal_separate_plain_forwards(runtime):
    """Two rows in one forward, each with context in its cache row, pending tokens, a lookahead window and
    phrases: every new token's argmax is a plain forward's over context + pending + its own trajectory."""
    rng = random.Random(2)
    vocab = 1000
    levels, width, phrase_len = 3, 4, 3
    rows = []
    for context_len, num_pending in ((15, 2), (8, 1)):
        context = [rng.randrange(vocab) for _ in range(context_len)]
        rows.append((prefilled(runtime, context), context, [rng.randrange(vocab) for _ in range(num_pending)]))
    plans, expected = [], []
    for _, context, pending in rows:
        window = [[rng.randrange(vocab) for _ in range(width)] for _ in range(levels)]
        phrases = [tuple(rng.randrange(vocab) for _ in range(phrase_len)) for _ in range(2)]
        mask, offsets = forward_layout(len(pending), len(phrases), phrase_len, levels, width)
        flat = pending + [t for level in window for t in level] + [t for p in phrases for t in p]
        plans.append(
            ForwardPlan(
                len(context),
                pending,
                phrases,
                [t for lv in window for t in lv],
                flat,
                mask,
                offsets + len(context),
                list(range(len(flat))),
            )
        )
        # Every new token's trajectory, as a plain sequence after the context.
        trajectories = [pending[: i + 1] for i in range(len(pending))]
        for level in range(levels):
            for column in range(width):
                trajectories.append(
                    pending
                    + (
                        window[0][: column + 1]
                        if level == 0
                        else window[0][:column] + [window[lv][column] for lv in range(1, level + 1)]
                    )
                )
        for phrase in phrases:
            trajectories += [pending + list(phrase[: i + 1]) for i in range(phrase_len)]
        expected.append([plain_logits(runtime, context + t)[-1] for t in trajectories])
    predicted = runtime.forward([(state, plan) for (state, _, _), plan in zip(rows, plans, strict=True)])
    for row, logits in zip(predicted, expected, strict=True):
        assert [row[i] for i in range(len(logits))] == [int(x.argmax()) for x in logits]
    for state, _, _ in rows:
        runtime.release(state)


def _oracle_phrases(history: list[int], truth: list[int], source: str, rng: random.Random):
    def phrases_for(key):
        full = history + truth
        found = [tuple(full[i + 1 : i + 5]) for i in range(len(history) - 1, len(full) - 4) if full[i] == key]
        noise_rng = random.Random(key)
        noise = [tuple(noise_rng.randrange(1000) for _ in range(4)) for _ in range(2)]
        return {"greedy": [], "oracle": found[:3], "random": noise, "mixed": noise[:1] + found[:2]}[source]

    return phrases_for


@pytest.mark.parametrize("window_width", [0, 3])
@pytest.mark.parametrize("phrase_source", ["oracle", "random", "mixed"])
def test_phrase_drafting_equals_plain_greedy_over_rounds(runtime, phrase_source, window_width):
    """Rounds as in serving: draft, the 'target' keeps a prefix and adds a token of its own, draft again. The
    cache left after every round equals a fresh prefill of the tokens it claims to hold."""
    rng = random.Random(1)
    history = [rng.randrange(1000) for _ in range(12)]
    state = DraftState()
    ngrams: list = []
    total_forwards = total_tokens = 0
    for _ in range(4):
        truth = greedy_reference(runtime, history, 10)
        round_ = draft(
            runtime,
            state,
            history,
            8,
            _oracle_phrases(history, truth, phrase_source, rng),
            window_shape=(4, window_width),
            ngrams=ngrams,
        )
        assert round_.drafted == truth[:8]
        assert_cache_equals_prefill(runtime, state)
        # Where a forward emitted its first token, the round also kept the draft's second choice there.
        assert 0 in round_.runner_ups and set(round_.runner_ups) <= set(range(8))
        assert set(round_.head_probs) == set(round_.runner_ups)
        for index, token in round_.runner_ups.items():
            logits = plain_logits(runtime, history + truth[:index])[-1].clone()
            # ... with the draft's probabilities of its first and second choice there
            probs = logits.float().softmax(-1)
            p1, p2 = round_.head_probs[index]
            assert p1 == pytest.approx(float(probs[truth[index]]), rel=1e-3, abs=1e-6)
            assert p2 == pytest.approx(float(probs[token]), rel=1e-3, abs=1e-6)
            logits[truth[index]] = float("-inf")
            assert token == int(logits.argmax())
        total_forwards += round_.forwards
        total_tokens += len(round_.drafted)
        keep = rng.randrange(0, 8)
        history = history + round_.drafted[:keep] + [rng.randrange(1000)]
    if phrase_source != "random":
        assert total_tokens > total_forwards, "phrases never saved a forward"
    # The window completes one N-gram per column per forward.
    assert len(ngrams) == window_width * total_forwards
    assert all(len(phrase) == 4 for _, phrase in ngrams)
    runtime.release(state)


@pytest.mark.parametrize(("phrase_source", "window_width"), [("greedy", 0), ("oracle", 0), ("oracle", 3), ("mixed", 3)])
def test_rows_drafted_together_equal_each_row_drafted_alone(runtime, phrase_source, window_width):
    """Serving-like rounds for 4 requests of different lengths and budgets (rows leave the shared forward at
    different steps): a one-token prompt, short prompts, a long prompt; after each round the 'target' keeps a
    random prefix. Each row drafts what it drafts alone, completes the same N-grams and keeps the same cache."""
    rng = random.Random(5)
    histories = [[rng.randrange(1000) for _ in range(n)] for n in (1, 5, 12, 40)]
    budgets = [6, 3, 8, 5]
    together = [DraftState() for _ in histories]
    alone = [DraftState() for _ in histories]
    scratch = [DraftState() for _ in histories]  # one token per forward: the truth the oracle's phrases come from
    for _ in range(4):
        rounds, expected = [], []
        found_together: list[list] = [[] for _ in histories]
        for i, history in enumerate(histories):
            truth = draft(runtime, scratch[i], history, 10).drafted
            phrases_for = _oracle_phrases(history, truth, phrase_source, rng)
            found: list = []
            lone = draft(runtime, alone[i], history, budgets[i], phrases_for, (4, window_width), found)
            assert lone.drafted == truth[: budgets[i]]  # float32: exact greedy
            expected.append((lone.drafted, lone.forwards, found))
            rounds.append(
                DraftRound(
                    together[i],
                    np.asarray(history),
                    budgets[i],
                    frozenset(),
                    runtime.info.vocab_size,
                    phrases_for=phrases_for,
                    window_shape=(4, window_width),
                    add_ngrams=found_together[i].extend,
                )
            )
        runtime.draft(rounds, wide=True)  # as each lone row (a lone row's forward always carries phrases)
        for i, round_ in enumerate(rounds):
            assert (round_.drafted, round_.forwards, found_together[i]) == expected[i]
            assert together[i].ids == alone[i].ids
            n = len(alone[i].ids)
            torch.testing.assert_close(
                runtime.cache.storage[:, :, together[i].cache_row, :, :n],
                runtime.cache.storage[:, :, alone[i].cache_row, :, :n],
                atol=1e-4,
                rtol=1e-4,
            )
        for i, history in enumerate(histories):
            keep = rng.randrange(0, budgets[i] + 1)
            histories[i] = history + rounds[i].drafted[:keep] + [rng.randrange(1000)]
    for state in together + alone + scratch:
        runtime.release(state)


def test_a_reproducible_draft_makes_no_choice_from_timings(tiny):
    """int8 scales the lm_head's activations per call, so how a forward splits its lm_head work changes the numbers
    a draft is read from: a reproducible draft (a seeded request's) makes one call a forward whatever this
    runtime's timings say, where an ordinary one follows them."""
    runtime = load(tiny.target, int8=True)
    runtime._two_lm_head_calls = lambda phrase_rows: True  # the timings say: split
    lm_head_calls = []
    runtime.model.get_output_embeddings().register_forward_hook(lambda *_: lm_head_calls.append(1))
    rng = random.Random(3)
    history = [rng.randrange(1000) for _ in range(12)]
    truth = draft(runtime, DraftState(), history, 8).drafted
    phrases_for = _oracle_phrases(history, truth, "oracle", rng)

    def calls_per_forward(reproducible: bool) -> tuple[int, int]:
        round_ = DraftRound(
            DraftState(), np.asarray(history), 8, frozenset(), runtime.info.vocab_size, phrases_for=phrases_for
        )
        lm_head_calls.clear()
        runtime.draft([round_], reproducible=reproducible)
        runtime.release(round_.state)
        return len(lm_head_calls), round_.forwards

    calls, forwards = calls_per_forward(reproducible=False)
    assert calls > forwards  # the phrase rows got a call of their own
    calls, forwards = calls_per_forward(reproducible=True)
    assert calls == forwards


def test_a_row_that_reaches_eos_leaves_the_batch_early(tiny):
    plain = load(tiny.target)
    rng = random.Random(9)
    histories = [[rng.randrange(1000) for _ in range(8)] for _ in range(3)]
    truths = [greedy_reference(plain, h, 6) for h in histories]
    eos = truths[0][1]
    runtime = DraftRuntime(plain.model, eos_token_ids=frozenset({eos}))
    rounds = [DraftRound(DraftState(), np.asarray(h), 6, frozenset({eos}), runtime.info.vocab_size) for h in histories]
    runtime.draft(rounds)
    assert rounds[0].drafted == truths[0][:2] and rounds[0].forwards == 2  # stopped at EOS; the others went on
    for round_, truth in zip(rounds[1:], truths[1:], strict=True):
        expected = truth[: truth.index(eos) + 1] if eos in truth else truth
        assert round_.drafted == expected


def test_a_phrase_with_ids_past_the_draft_vocabulary_is_never_fed(tiny):
    runtime = load(tiny.target)
    vocab = runtime.info.vocab_size
    history = [5, 6, 7]
    truth = greedy_reference(runtime, history, 4)
    round_ = draft(runtime, DraftState(), history, 4, phrases_for=lambda key: [(vocab + 3, 1, 2, 3), tuple(truth)])
    assert round_.drafted == truth and round_.forwards == 1


def test_sliding_window_models_are_refused(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny.target), dtype=torch.float32)
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    with pytest.raises(DraftModelError, match="sliding_attention"):
        DraftRuntime(model, eos_token_ids=frozenset())


def test_calibration_times_a_first_wave_of_made_up_requests_and_leaves_real_drafting_as_it_was(tiny):
    runtime = load(tiny.target)
    forwards = runtime.calibrate(batch_sizes=(1, 2, 4, 8), prompt_tokens=32, depth=4)
    # Per batch size: one forward reads every row's prompt, then one token a row a forward.
    expected = [(rows, tokens) for rows in (1, 2, 4, 8) for tokens in (32 * rows, rows, rows, rows)]
    assert [(rows, tokens) for rows, tokens, _ in forwards] == expected
    assert all(seconds > 0 for _, _, seconds in forwards)
    rng = random.Random(4)
    histories = [[rng.randrange(1000) for _ in range(10)] for _ in range(3)]
    rounds = [DraftRound(DraftState(), np.asarray(h), 6, frozenset(), runtime.info.vocab_size) for h in histories]
    runtime.draft(rounds)
    assert [r.drafted for r in rounds] == [greedy_reference(runtime, h, 6) for h in histories]
