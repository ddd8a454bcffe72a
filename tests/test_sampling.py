"""With temperature > 0 our drafts must not change the output distribution: vLLM's rejection sampler treats a
custom proposer's draft as a one-hot distribution, which keeps sampling exact. Checked statistically on a tiny
model: next-token frequencies at the first positions, plain against ours, by a chi-square homogeneity test."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from engine_utils import CODE_PROMPTS
from vllm import SamplingParams

from ouroboros_vllm.tools.offline import engine_proposer, make_llm

pytestmark = pytest.mark.engine

PROMPT = "def add(a, b):\n"
SAMPLES = 1500
POSITIONS = (1, 2, 3)  # position 0 is sampled by the target before any draft; the later ones follow drafts
MIN_BIN = 10  # tokens seen fewer times in both runs together share one bin


def chi_square_p_value(first: Counter, second: Counter) -> float:
    """p-value of "both samples come from one distribution" (chi-square test of homogeneity)."""
    frequent = sorted(t for t in set(first) | set(second) if first[t] + second[t] >= MIN_BIN)
    rows = [[sample[t] for t in frequent] for sample in (first, second)]
    for row, sample in zip(rows, (first, second), strict=True):
        row.append(sum(sample.values()) - sum(row))  # the pooled rare tokens
    observed = torch.tensor(rows, dtype=torch.float64)
    observed = observed[:, observed.sum(0) > 0]
    expected = observed.sum(1, keepdim=True) * observed.sum(0, keepdim=True) / observed.sum()
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = observed.shape[1] - 1
    return float(1 - torch.special.gammainc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def token_counts(llm, temperature: float, first_seed: int, neighbours: list[str] = ()) -> dict[int, Counter]:
    """Next-token counts at ``POSITIONS`` over ``SAMPLES`` seeded samples; ``neighbours``: greedy prompts sent in
    the same batch, first (their rows run beside the sampled ones)."""
    params = [
        SamplingParams(temperature=temperature, max_tokens=max(POSITIONS) + 1, seed=first_seed + i)
        for i in range(SAMPLES)
    ]
    greedy = [SamplingParams(temperature=0.0, max_tokens=48)] * len(neighbours)
    outputs = llm.generate([*neighbours, *[PROMPT] * SAMPLES], [*greedy, *params], use_tqdm=False)
    counts = {p: Counter() for p in POSITIONS}
    for output in outputs[len(neighbours) :]:
        ids = output.outputs[0].token_ids
        for p in POSITIONS:
            if len(ids) > p:
                counts[p][ids[p]] += 1
    return counts


@pytest.fixture(scope="module")
def sampled(tiny, engines):
    plain = engines.get("tiny-plain", lambda: make_llm(str(tiny.target), kv_cache_gib=0.25))
    ours = engines.get(
        "tiny-sampling-ouroboros",
        lambda: make_llm(
            str(tiny.target),
            ouroboros={"draft_model": str(tiny.draft_similar), "stats_log_interval_s": 0},
            num_speculative_tokens=4,
            kv_cache_gib=0.25,
        ),
    )
    # Sampled requests are verified as chains; greedy neighbours in the same batch as trees (pool-only drafting
    # with a doubtful pool: the runners-up get branches), which must not disturb the sampled rows.
    tree = engines.get(
        "tiny-sampling-tree",
        lambda: make_llm(
            str(tiny.target),
            ouroboros={"drafting": "pool_only", "adaptive": False, "verification": "tree", "stats_log_interval_s": 0},
            num_speculative_tokens=4,
            kv_cache_gib=0.25,
        ),
    )
    proposer, tree_proposer = engine_proposer(ours), engine_proposer(tree)
    accepted_before = proposer.stats.accepted_tokens
    trees_before = tree_proposer.stats.tree_rounds
    result = {
        "plain": token_counts(plain, 1.0, first_seed=0),
        "ours": token_counts(ours, 1.0, first_seed=SAMPLES),
        "tree": token_counts(tree, 1.0, first_seed=3 * SAMPLES, neighbours=CODE_PROMPTS),
        "plain-cooler": token_counts(plain, 0.7, first_seed=2 * SAMPLES),
    }
    result["accepted"] = proposer.stats.accepted_tokens - accepted_before
    result["trees"] = tree_proposer.stats.tree_rounds - trees_before
    return result


def test_drafts_were_accepted_while_sampling(sampled):
    # Otherwise every token would be the target's own resample and the test below would prove nothing.
    assert sampled["accepted"] > SAMPLES // 10, sampled["accepted"]


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("engine", ["ours", "tree"])
def test_sampled_tokens_follow_plain_decodings_distribution(sampled, engine, position):
    p_value = chi_square_p_value(sampled["plain"][position], sampled[engine][position])
    assert p_value > 1e-3, f"{engine}, position {position}: p = {p_value:.2g}"


def test_greedy_neighbours_of_the_sampled_requests_were_verified_as_trees(sampled):
    assert sampled["trees"] > 0


def test_the_chi_square_test_tells_another_temperature_apart(sampled):
    """The test has the power to see a real difference: temperature 0.7 against 1.0 at the same positions."""
    p_values = [chi_square_p_value(sampled["plain"][p], sampled["plain-cooler"][p]) for p in POSITIONS]
    assert min(p_values) < 1e-3, p_values
