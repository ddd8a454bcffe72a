"""verification "auto": trees at the batch sizes where a verified token is cheap next to a row's plain step."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ouroboros_vllm.algorithm.adaptive import AdaptiveController
from ouroboros_vllm.algorithm.tree_choice import TREE_SOURCES, UNTRIED_RATE, token_share, trees_pay

K = 8


def observed(
    rows: int, plain_step: float, per_token: float, branch_accepted: float | None = 0.15
) -> AdaptiveController:
    """A controller that saw steps of ``rows`` rows verifying 0..K tokens a row (plain ones among them) at
    ``plain_step`` seconds plus ``per_token`` a verified token, and the tree's added nodes accepted at
    ``branch_accepted`` (None: never examined)."""
    controller = AdaptiveController(max_tokens=K)
    for i in range(24):
        tokens = rows * (1 + i % (K + 1))
        controller.observe_target_step(tokens, plain_step + per_token * (tokens - rows), rows=rows)
    if branch_accepted is not None:
        for source in TREE_SOURCES:
            controller.acceptance.record_trials(source, 200, round(200 * branch_accepted))
    return controller


def test_trees_at_batch_1_on_a_cpu_and_chains_at_batch_8():
    # Batch 1 on the project's CPU: 9 tokens verified in about what a plain step takes (3.7 ms a token against a
    # 280 ms step). Batch 8: a verified token costs 13 ms against a plain step of 0.25 s over 8 rows (31 ms a row).
    batch_1, batch_8 = observed(1, 0.28, 0.0037), observed(8, 0.25, 0.013)
    assert token_share(batch_1.costs, 1) < 0.02 and 0.3 < token_share(batch_8.costs, 8) < 0.5
    assert trees_pay(batch_1, 1) and not trees_pay(batch_8, 8)


def test_no_trees_before_the_step_is_priced():
    assert token_share(AdaptiveController(max_tokens=K).costs, 1) is None
    assert not trees_pay(AdaptiveController(max_tokens=K), 1)


def test_trees_where_their_added_nodes_are_accepted_more_often_than_a_token_costs():
    # Batch 8's prices again, but the tree's alternatives are right 60% of the time (a repetitive text): they pay.
    assert trees_pay(observed(8, 0.25, 0.013, branch_accepted=0.6), 8)
    assert not trees_pay(observed(8, 0.25, 0.013, branch_accepted=0.2), 8)


def test_before_any_tree_was_verified_its_nodes_are_taken_as_weak_guesses():
    # A server's first steps at batch 8: no tree verified yet. The process's neutral 0.5 would read as above batch
    # 8's share of a token (0.42 here) and propose trees there; batch 1 still proposes them, and so measures them.
    assert UNTRIED_RATE < 0.3
    assert not trees_pay(observed(8, 0.25, 0.013, branch_accepted=None), 8)
    assert trees_pay(observed(1, 0.28, 0.0037, branch_accepted=None), 1)


@given(st.integers(1, 16), st.floats(0.05, 1.0), st.floats(0.0, 0.05), st.floats(0.0, 0.05), st.floats(0.0, 1.0))
def test_a_dearer_verified_token_never_turns_chains_into_trees(rows, plain_step, price_a, price_b, accepted):
    cheap, dear = sorted((price_a, price_b))
    at_cheap = observed(rows, plain_step, cheap, branch_accepted=accepted)
    at_dear = observed(rows, plain_step, dear, branch_accepted=accepted)
    assert token_share(at_cheap.costs, rows) <= token_share(at_dear.costs, rows) + 1e-9
    assert trees_pay(at_cheap, rows) or not trees_pay(at_dear, rows)
