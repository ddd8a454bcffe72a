"""Edge cases on the real engine (tiny models): preemption and recomputation under a small KV cache, prompts
near max_model_len, one-token prompts. Each must stay lossless and leave the proposer's state consistent."""

from __future__ import annotations

import pytest
from engine_utils import CODE_PROMPTS, first_difference, generate_ids, greedy, tokens_prompt

from ouroboros_vllm.offline import engine_proposer, make_llm

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
        "ours": engines.get("tiny-short-ouroboros", lambda: make_llm(
            str(tiny.target), ouroboros=settings, num_speculative_tokens=4, **common)),
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
