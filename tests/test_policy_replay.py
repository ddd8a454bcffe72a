"""benchmarks/policy_replay.py: the step planner replayed on recorded draft agreement under a table of step costs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package

from benchmarks import policy_replay as pr

COSTS = pr.StepCosts()


def ref(agree: list[bool], prompt: tuple[int, ...] = tuple(range(100, 130)), dataset: str = "d") -> pr.Reference:
    return pr.Reference(dataset, prompt, len(agree), tuple(agree))


def test_agreeing_runs() -> None:
    assert pr.agreeing_runs([True, True, False, True]) == [2, 1, 0, 1, 0]
    assert pr.agreeing_runs([]) == [0]


def test_step_costs_interpolate_between_one_and_eight_rows() -> None:
    assert COSTS.target(1, 5) == pytest.approx(COSTS.plain_1)  # one row: a verified token costs nothing
    assert COSTS.target(8, 8) == pytest.approx(COSTS.plain_8)
    assert COSTS.target(8, 10) == pytest.approx(COSTS.plain_8 + 2 * COSTS.token_8)
    assert COSTS.draft(3, catch_up=10) == pytest.approx(
        COSTS.draft_forward + 3 * COSTS.draft_token + 10 * COSTS.catch_up_token
    )


def test_plain_emits_one_token_a_row_a_step() -> None:
    refs = [ref([True] * 9), ref([True] * 5)]
    one = pr.replay_plain(refs, 1, COSTS)
    assert (one.steps, one.emitted) == (12, 12)  # the prefill's token is not a decode step
    assert one.seconds == pytest.approx(12 * COSTS.plain_1)
    two = pr.replay_plain(refs, 2, COSTS)
    assert (two.steps, two.emitted) == (8, 12)
    assert two.seconds == pytest.approx(4 * COSTS.target(2, 2) + 4 * COSTS.target(1, 1))


def test_fixed_depth_accepts_up_to_the_first_disagreement() -> None:
    # Output of 10 tokens; the draft disagrees at position 3. Fixed depth 4 from position 1: tokens 1-2 accepted,
    # the target's own token at 3; then from 4: 4 accepted (4-7) and 8; then 9 is left alone (nothing follows it).
    agree = [True, True, True, False, True, True, True, True, True, True]
    out = pr.replay([ref(agree)], 1, 4, COSTS, "fixed:4")
    assert out.steps == 3
    assert (out.proposed, out.accepted, out.emitted) == (4 + 4 + 0, 2 + 4, 9)
    assert out.lengths == {4: 2, 0: 1}
    # The first forward read the prompt (30 tokens) on top of the row's own token.
    assert out.catch_up_seconds == pytest.approx(30 * COSTS.catch_up_token)
    drafting = 8 * COSTS.draft(1) + 30 * COSTS.catch_up_token
    assert out.seconds == pytest.approx(3 * COSTS.plain_1 + drafting)


def test_a_prompt_prefix_read_before_is_not_read_again() -> None:
    shared = tuple(range(1000, 1040))
    first, second = ref([True] * 6, shared + (1, 2, 3)), ref([True] * 6, shared + (4, 5))
    out = pr.replay([first, second], 1, 4, COSTS, "fixed:1")
    assert out.catch_up_seconds == pytest.approx((43 + 2) * COSTS.catch_up_token)
    assert pr.shared_prefix(second.prompt, [first.prompt]) == 40
    assert pr.shared_prefix((1000, 1001, 7), [first.prompt]) == 0  # shorter than MIN_SHARED: read again


agreements = st.lists(st.lists(st.booleans(), min_size=2, max_size=40), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(agreements, st.sampled_from([1, 3, 8]), st.integers(1, 6))
def test_every_policy_emits_plains_tokens(agree, batch_size, k) -> None:
    refs = [ref(a) for a in agree]
    tokens = sum(len(a) - 1 for a in agree)
    oracle = pr.replay(refs, batch_size, k, COSTS, "oracle")
    assert oracle.emitted == tokens and oracle.accepted == oracle.proposed  # it proposes only what is accepted
    assert oracle.catch_up_seconds == 0
    for depth in range(1, k + 1):
        fixed = pr.replay(refs, batch_size, k, COSTS, f"fixed:{depth}")
        assert fixed.emitted == tokens and max(fixed.lengths) <= depth
    planner = pr.replay(refs, batch_size, k, COSTS, "planner")
    assert planner.emitted == tokens and max(planner.lengths) <= k


def test_the_oracle_proposes_each_rows_agreeing_run() -> None:
    # Runs of 3 agreeing tokens then a disagreement: the oracle proposes exactly 3 and never a token more.
    agree = ([True] * 3 + [False]) * 5
    out = pr.replay([ref(agree)], 1, 4, COSTS, "oracle")
    assert out.accepted == out.proposed and out.lengths.get(4, 0) == 0 and out.lengths[3] >= 4
    fixed = pr.replay([ref(agree)], 1, 4, COSTS, "fixed:4")
    assert out.seconds < fixed.seconds - fixed.catch_up_seconds


def test_the_planner_drafts_deep_when_the_draft_always_agrees_and_not_when_it_never_does() -> None:
    cheap = pr.StepCosts(draft_forward=0.005, draft_token=0.0005, catch_up_token=0.0001)
    agreeing = [ref([True] * 200, tuple(range(1, 20 + i))) for i in range(4)]
    out = pr.replay(agreeing, 1, 4, cheap, "planner")
    assert out.lengths.get(4, 0) > 0.8 * sum(out.lengths.values())
    plain = pr.replay_plain(agreeing, 1, cheap)
    assert plain.seconds / out.seconds > 3.0

    disagreeing = [ref([False] * 200, tuple(range(1, 20 + i))) for i in range(4)]
    out = pr.replay(disagreeing, 1, 4, COSTS, "planner")
    assert out.lengths.get(0, 0) > 0.8 * sum(out.lengths.values())
    plain = pr.replay_plain(disagreeing, 1, COSTS)
    assert plain.seconds / out.seconds > 0.9  # what it spent learning that drafting does not pay


def test_the_planner_is_deterministic_and_noise_changes_only_what_it_is_shown() -> None:
    refs = [ref([i % 3 != 0 for i in range(60)], tuple(range(i, i + 25))) for i in range(3)]
    assert pr.replay(refs, 2, 4, COSTS, "planner") == pr.replay(refs, 2, 4, COSTS, "planner")
    noisy = pr.replay(refs, 2, 4, COSTS, "planner", noise=0.3, seed=1)
    assert noisy.emitted == pr.replay(refs, 2, 4, COSTS, "planner").emitted


def test_compare_groups_by_dataset_and_pools(tmp_path: Path) -> None:
    refs = [ref([True, False] * 10, dataset="a"), ref([True] * 20, dataset="b")]
    results = pr.compare(refs, [1, 2], 3, COSTS, ["fixed:2", "oracle"], noise=0.0, seed=0)
    assert {(r["batch_size"], r["dataset"], r["policy"]) for r in results} == {
        (b, d, p) for b in (1, 2) for d in ("a", "b", "pooled") for p in ("fixed:2", "oracle")
    }
    table = pr.table(results, ["fixed:2", "oracle"])
    assert "| oracle |" in table and "batch size 2" in table


def test_load_run_labels_references_with_their_datasets(tmp_path: Path) -> None:
    refs = [{"prompt_token_ids": [1, 2], "output_token_ids": [5, 6, 7]},
            {"prompt_token_ids": [3], "output_token_ids": [8]}]  # fmt: skip
    (tmp_path / "references.json").write_text(json.dumps({"references": refs}))
    prompts = [{"id": "x", "output_token_ids": [5, 6, 7]}]
    runs = [{"dataset": "code", "max_tokens": 64, "prompts": prompts}]
    (tmp_path / "results.json").write_text(json.dumps({"results": [{"method": "plain", "runs": runs}]}))
    loaded = pr.load_run(tmp_path)
    assert [(r["dataset"], r["max_tokens"]) for r in loaded] == [("code", 64), ("?", 1)]


def test_agreement_of_the_target_with_itself_is_complete(tiny) -> None:
    """Recorded on a real (tiny) model: the target drafting for itself agrees with its own greedy output at every
    position; an unrelated draft does not."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.target, dtype=torch.float32).eval()
    prompt = [5, 17, 42, 9]
    with torch.inference_mode():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    refs = [{"prompt_token_ids": prompt, "output_token_ids": generated[0, len(prompt) :].tolist()}]
    assert pr.record_agreement(refs, str(tiny.target), "float32", str(tiny.target)) == [[True] * 12]
    other = pr.record_agreement(refs, str(tiny.draft), "float32", str(tiny.target))[0]
    assert len(other) == 12 and not all(other)


def test_a_one_token_answer_costs_no_decode_step() -> None:
    refs = [ref([True]), ref([True] * 3)]
    for policy in ("fixed:2", "planner", "oracle"):
        out = pr.replay(refs, 2, 2, COSTS, policy)
        assert out.emitted == 2 and out.steps <= 2
    assert pr.replay_plain(refs, 2, COSTS).steps == 2


@pytest.mark.parametrize("policy", ["fixed:0", "fixed:9", "fixed:x", "greedy", ""])
def test_an_unknown_policy_is_refused(policy: str) -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        pr.replay([ref([True] * 4)], 1, 8, COSTS, policy)
    with pytest.raises(SystemExit):
        pr.main(["--run", "/nonexistent", "--policies", policy or "none"])


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        pr.main(["--run", str(tmp_path)])
    assert "lacks references.json and results.json" in capsys.readouterr().err


def test_a_finished_rows_slot_is_filled_at_the_next_step() -> None:
    """With a draft that never agrees every policy emits one token a row a step, so it takes plain's steps exactly:
    a request waiting in the queue must join at the step after a row finished, as continuous batching does."""
    refs = [ref([False] * n) for n in (3, 10, 10, 4, 7)]
    for batch_size in (1, 2, 3):
        plain = pr.replay_plain(refs, batch_size, COSTS)
        for policy in ("fixed:1", "fixed:3", "oracle"):
            assert pr.replay(refs, batch_size, 3, COSTS, policy).steps == plain.steps
