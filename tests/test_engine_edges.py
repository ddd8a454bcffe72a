"""Edge cases on the real engine (tiny models): preemption and recomputation under a small KV cache, prompts
near max_model_len, one-token prompts. Each must stay lossless and leave the proposer's state consistent."""

from __future__ import annotations

import pytest
from engine_utils import CODE_PROMPTS, first_difference, generate_ids, greedy, tokens_prompt

from ouroboros_vllm.tools.offline import engine_proposer, make_llm

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 256
# The tiny target keeps 4 layers x 2 KV heads x 64 dims x (K, V) x 4 bytes = 4 KiB per token: 1024 tokens fit.
SMALL_KV_GIB = 1024 * 4096 / (1 << 30)


@pytest.fixture(scope="module")
def short(tiny, engines):
    """Plain and ours with a short max_model_len and a KV cache that holds only a few requests at once."""
    settings = {"draft_model": str(tiny.draft_similar), "stats_log_interval_s": 0}
    common = dict(max_model_len=MAX_MODEL_LEN, kv_cache_gib=SMALL_KV_GIB, disable_log_stats=False)
    return {
        "plain": engines.get("tiny-short-plain", lambda: make_llm(str(tiny.target), **common)),
        "ours": engines.get(
            "tiny-short-ouroboros",
            lambda: make_llm(str(tiny.target), ouroboros=settings, num_speculative_tokens=4, **common),
        ),
    }


def preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preempted_requests_resume_losslessly(short):
    prompts = [p[:200] for p in CODE_PROMPTS]  # 8 requests x up to 200 new tokens: far more than 1024 tokens
    before = preemptions(short["ours"])
    expected = generate_ids(short["plain"], prompts, greedy(200, ignore_eos=True), len(prompts))
    actual = generate_ids(short["ours"], prompts, greedy(200, ignore_eos=True), len(prompts))
    assert actual == expected, first_difference(expected, actual)
    assert preemptions(short["ours"]) > before, "the KV cache was large enough: nothing was preempted"
    short["ours"].llm_engine.step()  # flush the finished requests
    assert engine_proposer(short["ours"]).requests == {}


@pytest.mark.parametrize("room", [1, 2, 3, 5, 9])
def test_prompts_that_nearly_fill_max_model_len(short, room):
    """A draft must leave room for the target's own token: near the end, K shrinks to what still fits."""
    prompt = tokens_prompt([(7 * i) % 1000 + 10 for i in range(MAX_MODEL_LEN - room)])
    expected = generate_ids(short["plain"], [prompt], greedy(room, ignore_eos=True), 1)
    actual = generate_ids(short["ours"], [prompt], greedy(room, ignore_eos=True), 1)
    assert actual == expected and len(actual[0]) == room


def test_one_token_prompts(short):
    prompts = [tokens_prompt([token]) for token in (1, 42, 777)]
    expected = generate_ids(short["plain"], prompts, greedy(24), 3)
    assert generate_ids(short["ours"], prompts, greedy(24), 3) == expected


@pytest.fixture(scope="module")
def narrow_draft(tiny, tmp_path_factory):
    """The similar draft with an embedding table of 1024 rows: the target's tokenizer (1536 ids) is shared,
    so the plugin accepts it, but ids from 1024 up cannot be fed to it (like a target padded past the draft)."""
    import shutil

    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("narrow-draft")
    model = AutoModelForCausalLM.from_pretrained(str(tiny.draft_similar))
    model.resize_token_embeddings(1024)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny.draft_similar / name).exists():
            shutil.copy(tiny.draft_similar / name, path / name)
    return path


def test_token_ids_past_the_drafts_vocabulary(tiny, engines, narrow_draft):
    """A request holding such ids drafts from the pool only; phrases holding them never reach the draft."""
    plain = engines.get("tiny-plain", lambda: make_llm(str(tiny.target), kv_cache_gib=0.25))
    ours = engines.get(
        "tiny-narrow-draft",
        lambda: make_llm(
            str(tiny.target),
            ouroboros={"draft_model": str(narrow_draft), "stats_log_interval_s": 0},
            num_speculative_tokens=4,
            kv_cache_gib=0.25,
        ),
    )
    high = [1400, 1401, 1402, 1403, 1404]
    prompts = [
        tokens_prompt([5, 6, *high, 7, 8] * 6),  # out of the draft's range: pool only
        tokens_prompt([9, 5, 6, 11, 12, 5, 6]),
    ]  # in range, but the pool's phrases after 6 are not
    for prompt in prompts:
        expected = generate_ids(plain, [prompt], greedy(24), 1)
        assert generate_ids(ours, [prompt], greedy(24), 1) == expected
    proposer = engine_proposer(ours)
    assert proposer.drafter.info.vocab_size == 1024
    assert any(max(phrase) >= 1024 for phrase in proposer.pool.phrases(6)), "the test did not set the trap"
