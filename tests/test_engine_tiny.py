"""The real vLLM engine with OuroborosProposer on tiny random-weight models: lossless, hooks, state lifetime."""

from __future__ import annotations

import pytest
from engine_utils import CODE_PROMPTS, first_difference, generate_ids, greedy, tokens_prompt

from ouroboros_vllm.algorithm.adaptive import TRUSTED_DRAFT_SAMPLES
from ouroboros_vllm.tools.offline import engine_proposer, make_llm

pytestmark = pytest.mark.engine

K = 4
MAX_TOKENS = 40


@pytest.fixture(scope="session")
def plain(tiny, engines):
    return engines.get("tiny-plain", lambda: make_llm(str(tiny.target), kv_cache_gib=0.25))


def spec_engine(engines, tiny, draft_name: str | None, drafting: str = "greedy", k: int = K, verification="chain"):
    # Fixed lengths: these tests check what verification does with every draft, so every draft must be proposed
    # (the adaptive planner would stop proposing an unrelated draft's tokens; see test_adaptive_*).
    settings = {"drafting": drafting, "adaptive": False, "stats_log_interval_s": 0, "verification": verification}
    if draft_name is not None:
        draft = {"self": tiny.target, "unrelated": tiny.draft, "similar": tiny.draft_similar}[draft_name]
        settings["draft_model"] = str(draft)
    if draft_name == "self":
        # The self-draft must be the target itself to be always right; the default int8 draft is not.
        settings["draft_dtype"] = "float32"
    return engines.get(
        f"tiny-ouroboros-{draft_name}-{drafting}-k{k}" + ("-tree" if verification == "tree" else ""),
        lambda: make_llm(str(tiny.target), ouroboros=settings, num_speculative_tokens=k, kv_cache_gib=0.25),
    )


@pytest.mark.parametrize(
    ("draft_name", "drafting", "verification"),
    [
        ("unrelated", "greedy", "chain"),
        ("similar", "greedy", "chain"),
        ("self", "greedy", "chain"),
        ("similar", "greedy_pool", "chain"),
        ("similar", "ouroboros", "chain"),
        (None, "pool_only", "chain"),
        ("similar", "ouroboros", "tree"),
        (None, "pool_only", "tree"),
    ],
)
@pytest.mark.parametrize("batch_size", [1, 8])
def test_greedy_outputs_equal_plain_decoding(plain, tiny, engines, draft_name, drafting, verification, batch_size):
    spec = spec_engine(engines, tiny, draft_name, drafting, verification=verification)
    proposer = engine_proposer(spec)
    before, trees_before = proposer.stats.verified_tokens, proposer.stats.tree_rounds
    expected = generate_ids(plain, CODE_PROMPTS, greedy(MAX_TOKENS), batch_size)
    actual = generate_ids(spec, CODE_PROMPTS, greedy(MAX_TOKENS), batch_size)
    assert actual == expected, first_difference(expected, actual)
    assert proposer.stats.verified_tokens > before, "the proposer drafted nothing: the test compared plain with plain"
    if verification == "tree" and drafting == "pool_only" and batch_size == 1:
        # A cold pool's suffixes are doubtful, so trees must happen (the batch-8 pass repeats the prompts: sure).
        assert proposer.stats.tree_rounds > trees_before, "no tree was verified"


def test_acceptance_follows_the_draft(plain, tiny, engines):
    """Self-draft is always right, an unrelated random draft almost never: the stats must show it."""
    for name in ("self", "unrelated"):
        generate_ids(spec_engine(engines, tiny, name), CODE_PROMPTS, greedy(MAX_TOKENS), 8)
    assert engine_proposer(spec_engine(engines, tiny, "self")).stats.acceptance_rate == 1.0
    assert engine_proposer(spec_engine(engines, tiny, "unrelated")).stats.acceptance_rate < 0.5


def test_hooks_report_request_ids_argmax_and_finished_requests(plain, tiny, engines, monkeypatch):
    """Record what the hooks deliver during a real run and check it against vLLM and plain decoding."""
    spec = spec_engine(engines, tiny, "similar")
    proposer = engine_proposer(spec)
    batches, proposals, verifications = [], {}, []
    original_on_batch, original_propose, original_on_verified = (
        proposer.on_batch,
        proposer.propose,
        proposer.on_verified,
    )

    def on_batch(req_ids):
        batches.append(list(req_ids))
        original_on_batch(req_ids)

    def propose(sampled, num_tokens, token_ids, slot_mappings=None):
        req_ids = list(proposer._batch_req_ids)
        drafts = original_propose(sampled, num_tokens, token_ids, slot_mappings)
        for row, (req_id, draft) in enumerate(zip(req_ids, drafts, strict=True)):
            proposals[req_id] = (token_ids[row, : num_tokens[row]].tolist(), draft)
        return drafts

    def on_verified(req_ids, drafts, target_argmax, **kwargs):
        for req_id, draft, argmax in zip(req_ids, drafts, target_argmax, strict=True):
            if draft:
                history, proposed = proposals[req_id]
                verifications.append((req_id, history, proposed, draft, argmax))
        original_on_verified(req_ids, drafts, target_argmax, **kwargs)

    monkeypatch.setattr(proposer, "on_batch", on_batch)
    monkeypatch.setattr(proposer, "propose", propose)
    monkeypatch.setattr(proposer, "on_verified", on_verified)
    outputs = spec.generate(CODE_PROMPTS[:4], greedy(24), use_tqdm=False)

    # Request ids: the hook saw exactly the requests vLLM reports (internal ids extend the external ones).
    seen = {req_id for batch in batches for req_id in batch}
    assert len(seen) == len(outputs)
    for output in outputs:
        assert sum(req_id.startswith(output.request_id) for req_id in seen) == 1

    # The target verified what we proposed, and the argmax covers every draft position plus the bonus.
    assert verifications, "nothing was verified"
    for _, _, proposed, draft, argmax in verifications:
        assert draft == proposed[: len(draft)]
        assert len(argmax) == len(draft) + 1

    # The argmax at EVERY verified position, after a rejection too, is what plain decoding predicts there.
    checks = [
        (history + draft[:j], argmax[j])
        for _, history, _, draft, argmax in verifications
        for j in range(len(draft) + 1)
    ]
    assert any(draft != argmax[: len(draft)] for _, _, _, draft, argmax in verifications), (
        "no rejection happened: positions after a rejection were not exercised"
    )
    predicted = generate_ids(plain, [tokens_prompt(prefix) for prefix, _ in checks], greedy(1), len(checks))
    assert [p[0] for p in predicted] == [expected for _, expected in checks]


def test_pool_modes_draft_from_the_pool(plain, tiny, engines):
    generate_ids(spec_engine(engines, tiny, "similar", "greedy_pool"), CODE_PROMPTS, greedy(MAX_TOKENS), 8)
    stats = engine_proposer(spec_engine(engines, tiny, "similar", "greedy_pool")).stats
    assert stats.suffix_tokens > 0 and stats.proposed_tokens > stats.suffix_tokens, stats.summary()
    generate_ids(spec_engine(engines, tiny, None, "pool_only"), CODE_PROMPTS, greedy(MAX_TOKENS), 8)
    pool_only = engine_proposer(spec_engine(engines, tiny, None, "pool_only"))
    assert pool_only.drafter is None and len(pool_only.pool) > 0
    assert pool_only.stats.suffix_tokens == pool_only.stats.proposed_tokens > 0, pool_only.stats.summary()
    # A draft model named next to pool_only is not loaded (nor used).
    assert engine_proposer(spec_engine(engines, tiny, "similar", "pool_only")).drafter is None


def test_warm_pool_carries_phrases_across_requests(plain, tiny, engines):
    """The second request with the same prompt finds the first one's text in the shared pool."""
    spec = spec_engine(engines, tiny, None, "pool_only", k=6)
    proposer = engine_proposer(spec)
    prompt = "warm start: " + CODE_PROMPTS[3]
    accepted = []
    for _ in range(2):
        before = proposer.stats.accepted_tokens
        (ids,) = generate_ids(spec, [prompt], greedy(64), 1)
        accepted.append(proposer.stats.accepted_tokens - before)
    assert ids == generate_ids(plain, [prompt], greedy(64), 1)[0]
    assert accepted[1] > accepted[0] + 20, accepted


def test_cold_pools_are_per_request(plain, tiny, engines, tmp_path):
    settings = {"drafting": "pool_only", "warm_start": False, "adaptive": False, "stats_log_interval_s": 0}
    spec = engines.get(
        "tiny-pool-only-cold",
        lambda: make_llm(str(tiny.target), ouroboros=settings, num_speculative_tokens=6, kv_cache_gib=0.25),
    )
    proposer = engine_proposer(spec)
    prompt = "cold start: " + CODE_PROMPTS[3]
    accepted = []
    for _ in range(2):
        before = proposer.stats.accepted_tokens
        generate_ids(spec, [prompt], greedy(64), 1)
        accepted.append(proposer.stats.accepted_tokens - before)
    assert accepted[0] == accepted[1], "a request saw another request's phrases"
    assert len(proposer.pool) == 0


def test_a_cold_request_neither_reads_nor_feeds_the_shared_pool(plain, tiny, engines):
    """extra_args {"ouroboros_pool": "cold"}: the request drafts from a pool of its own, beside warm traffic."""
    spec = spec_engine(engines, tiny, None, "pool_only", k=6)
    proposer = engine_proposer(spec)
    prompt = "cold request: " + CODE_PROMPTS[2]
    generate_ids(spec, [prompt], greedy(64), 1)  # the shared pool now knows this text
    shared = list(proposer.pool.items())
    accepted = []
    for _ in range(2):
        before = proposer.stats.accepted_tokens
        (ids,) = generate_ids(spec, [prompt], greedy(64, extra_args={"ouroboros_pool": "cold"}), 1)
        accepted.append(proposer.stats.accepted_tokens - before)
        assert ids == generate_ids(plain, [prompt], greedy(64), 1)[0]
    assert list(proposer.pool.items()) == shared, "a cold request changed the shared pool"
    assert accepted[0] == accepted[1], "a cold request saw phrases from outside its own pool"
    before = proposer.stats.accepted_tokens
    generate_ids(spec, [prompt], greedy(64), 1)
    assert proposer.stats.accepted_tokens - before > accepted[0], "the shared pool did not help a warm request"


def test_saved_pool_reloads_in_a_new_engine(plain, tiny, engines, tmp_path):
    path = tmp_path / "pool.bin"
    settings = {"drafting": "pool_only", "pool_path": str(path), "adaptive": False, "stats_log_interval_s": 0}
    first = engines.get(
        "tiny-pool-file-1",
        lambda: make_llm(str(tiny.target), ouroboros=settings, num_speculative_tokens=6, kv_cache_gib=0.25),
    )
    prompt = "persisted: " + CODE_PROMPTS[5]
    generate_ids(first, [prompt], greedy(64), 1)
    saved = engine_proposer(first)
    saved.pool_file.save(saved.pool)

    second = engines.get(
        "tiny-pool-file-2",
        lambda: make_llm(str(tiny.target), ouroboros=settings, num_speculative_tokens=6, kv_cache_gib=0.25),
    )
    loaded = engine_proposer(second)
    assert list(loaded.pool.items()) == list(saved.pool.items())
    (ids,) = generate_ids(second, [prompt], greedy(64), 1)
    assert ids == generate_ids(plain, [prompt], greedy(64), 1)[0]
    assert loaded.stats.accepted_tokens > saved.stats.accepted_tokens  # the warm pool drafts better at once


def test_finished_requests_leave_no_state(plain, tiny, engines):
    spec = spec_engine(engines, tiny, "similar")
    proposer = engine_proposer(spec)
    prompts = [CODE_PROMPTS[i % len(CODE_PROMPTS)] + str(i) for i in range(100)]
    outputs = spec.generate(prompts, greedy(6), use_tqdm=False)
    assert len(outputs) == 100
    # vLLM tells the runner which requests finished in its next step; with nothing left to run the engine
    # core still takes that step to flush them.
    spec.llm_engine.step()
    assert proposer.requests == {}
    assert proposer.stats.rounds > 0
    # What they emitted is remembered (the last 64): a running request's expected remaining tokens come from it.
    assert len(proposer.lengths) == 64 and 0 < proposer.lengths.expected_remaining(0, None) <= 6


def adaptive_engine(engines, tiny, draft_name: str, drafting: str = "auto"):
    """Adaptive lengths (the default), float32 drafts; drafting "auto" (the default) unless told. Chains: these
    engines test the lengths the planner chooses (a tree's second choices beside an always-right draft's tokens
    are rejected by design; verification "auto" has tests of its own, tests/test_tree_engine.py)."""
    draft = {"self": tiny.target, "unrelated": tiny.draft}[draft_name]
    settings = {"draft_model": str(draft), "draft_dtype": "float32", "drafting": drafting, "stats_log_interval_s": 0}
    settings["verification"] = "chain"
    return engines.get(
        f"tiny-adaptive-{draft_name}-{drafting}",
        lambda: make_llm(str(tiny.target), ouroboros=settings, num_speculative_tokens=K, kv_cache_gib=0.25),
    )


def test_adaptive_speculation_stops_drafting_where_it_cannot_pay(plain, tiny, engines):
    """A draft the target never agrees with: after a few steps of measuring, the planner proposes no draft-model
    tokens; a step without proposals runs no draft forward. Lossless throughout.

    Draft-model tokens only ("greedy"): with "auto" the second pass would also propose the pool's suffixes of the
    first pass's outputs, which the target accepts, and whether the planner finds them worth proposing depends on
    the measured costs; that is right, but it is not what this test is about."""
    spec = adaptive_engine(engines, tiny, "unrelated", drafting="greedy")
    proposer = engine_proposer(spec)
    assert len(proposer.controller.costs.draft) >= TRUSTED_DRAFT_SAMPLES  # the draft was timed at engine start
    expected = generate_ids(plain, CODE_PROMPTS, greedy(MAX_TOKENS), 8)
    assert generate_ids(spec, CODE_PROMPTS, greedy(MAX_TOKENS), 8) == expected  # learns here
    lengths, steps = dict(proposer.controller.stats.lengths), proposer.controller.stats.planned_steps
    assert generate_ids(spec, CODE_PROMPTS, greedy(MAX_TOKENS), 8) == expected
    steps = proposer.controller.stats.planned_steps - steps
    assert steps > 20, steps
    # Rows propose only where the planner measures: each new request's first trunk, the target-cost probes (one
    # step in PROBE_EVERY while the steps look alike), a rare exploration step. Nearly every row proposes 0.
    rows = {n: c - lengths.get(n, 0) for n, c in proposer.controller.stats.lengths.items()}
    assert rows.get(0, 0) >= 0.75 * sum(rows.values()), f"it kept proposing: {rows}"
    assert "proposed lengths 0:" in proposer.summary()


def test_adaptive_speculation_is_lossless_with_an_always_right_draft(plain, tiny, engines):
    """How much it drafts here depends on the timings (for the tiny models a draft forward costs about what a
    target step does, so deep drafts barely pay): the test checks that the draft model's tokens it proposes are
    accepted (nearly all: vLLM may schedule fewer than proposed) and the output plain's; the planner's choices
    are tested on their own in tests/test_adaptive.py."""
    spec = adaptive_engine(engines, tiny, "self")
    proposer = engine_proposer(spec)
    expected = generate_ids(plain, CODE_PROMPTS, greedy(MAX_TOKENS), 1)
    assert generate_ids(spec, CODE_PROMPTS, greedy(MAX_TOKENS), 1) == expected
    stats = proposer.stats
    trunk_proposed = stats.proposed_tokens - stats.suffix_tokens
    assert trunk_proposed > 0
    assert stats.accepted_tokens - stats.suffix_accepted_tokens >= 0.9 * trunk_proposed  # the trunk: always right
