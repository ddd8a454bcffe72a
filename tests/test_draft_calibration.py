"""benchmarks/draft_calibration.py: the draft's calibration, and batch 1 replayed as chains and as trees."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package

from benchmarks import draft_calibration as dc


def positions(first: list[tuple[float, bool]], second: list[tuple[float, bool]] | None = None) -> dc.Positions:
    second = second or [(0.0, False)] * len(first)
    return dc.Positions("d", *(tuple(x for x, _ in first), tuple(x for x, _ in second)),
                        tuple(ok for _, ok in first), tuple(ok for _, ok in second))  # fmt: skip


def test_the_table_counts_each_bin_and_the_second_choice_where_the_first_was_wrong() -> None:
    ref = positions([(0.95, True), (0.96, True), (0.55, False), (0.52, True)], [(0.01, False), (0.0, False),
                    (0.4, True), (0.3, False)])  # fmt: skip
    by_bin = {row["from"]: row for row in dc.calibration_table([ref])}
    assert by_bin[0.95]["tokens"] == 2 and by_bin[0.95]["accepted"] == 1.0
    assert by_bin[0.5]["tokens"] == 2 and by_bin[0.5]["accepted"] == 0.5
    assert by_bin[0.5]["second_right_when_first_wrong"] == 1.0
    assert by_bin[0.5]["mean_probability"] == pytest.approx(0.535)


def test_a_sure_right_draft_makes_the_same_steps_as_a_chain_or_a_tree() -> None:
    ref = positions([(0.999, True)] * 30, [(0.0005, False)] * 30)
    chain, tree = dc.replay([ref], 4, tree=False), dc.replay([ref], 4, tree=True)
    assert chain.steps == tree.steps == 6 and chain.accepted == tree.accepted == 23  # 29 decode tokens
    assert tree.second_choices_taken == 0 and tree.forwards == chain.forwards


def test_a_tree_takes_the_second_choice_where_the_draft_doubts_its_first() -> None:
    # The first choice is wrong every time at 0.4; the second is right at 0.5 (of the 0.6 left): a chain accepts
    # nothing, a tree hangs the second choice beside the first token and gets it every step.
    ref = positions([(0.4, False)] * 20, [(0.5, True)] * 20)
    chain, tree = dc.replay([ref], 4, tree=False), dc.replay([ref], 4, tree=True)
    assert chain.accepted == 0 and chain.tau() == 1.0
    # 19 tokens to decode: every step takes the second choice and its own token, but the last (one token left).
    assert (tree.steps, tree.accepted, tree.second_choices_taken) == (10, 9, 9)
    assert tree.forwards < chain.forwards  # drafting stops once deeper tokens could not be proposed


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 1.0), st.booleans(), st.floats(0.0, 0.5), st.booleans()), min_size=1,
                max_size=40), st.integers(1, 8))  # fmt: skip
def test_every_step_emits_plains_tokens_and_no_more(rows, k) -> None:
    # A second choice is never plain's token where the first is.
    ref = positions([(p, ok) for p, ok, _, _ in rows], [(q, right and not ok) for _, ok, q, right in rows])
    for tree in (False, True):
        tally = dc.replay([ref], k, tree)
        assert tally.accepted + tally.steps == tally.tokens == len(rows) - 1
        assert tally.forwards <= k * tally.steps


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        dc.main(["--run", str(tmp_path)])
    assert "lacks references.json and results.json" in capsys.readouterr().err


def test_the_target_drafting_for_itself_is_right_at_every_position(tiny) -> None:
    """Recorded on a real (tiny) model: its first choice is its own greedy output everywhere, with the softmax
    probabilities of its two likeliest tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.target, dtype=torch.float32).eval()
    prompt = [5, 17, 42, 9]
    with torch.inference_mode():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
        probs = model(generated).logits[0, len(prompt) - 1 : -1].softmax(-1)
    refs = [{"dataset": "d", "prompt_token_ids": prompt, "output_token_ids": generated[0, len(prompt) :].tolist()}]
    [recorded] = dc.record(refs, str(tiny.target), "float32", str(tiny.target))
    assert recorded["first_right"] == [True] * 10 and not any(recorded["second_right"])
    top = probs.topk(2, dim=-1).values
    assert recorded["first_prob"] == pytest.approx(top[:, 0].tolist(), rel=1e-4)
    assert recorded["second_prob"] == pytest.approx(top[:, 1].tolist(), rel=1e-4)
