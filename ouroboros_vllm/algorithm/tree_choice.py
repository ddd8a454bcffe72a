"""Whether a step's proposals are trees or chains, for ``verification: "auto"`` (the default).

A tree spends part of a row's node budget on alternatives (the pool's runners-up, the draft's second choices)
instead of the chain's deepest tokens. Where a verified token costs next to nothing, as at batch 1 on a CPU (9
tokens verified in about what a plain step takes), that trade wins: trees ran 1.81x against the chain's 1.74x over
8 datasets, 3.10x against 2.77x on HumanEval (K = 8, both ways round, docs/benchmarks.md). Where a verified token
costs a good share of what a row's plain step does, as at batch 8 on a CPU (35-55%), an alternative must be
accepted about that often to pay for its place, and the alternatives are weak guesses (10-20% accepted): there
trees ran behind the chain (0.86-0.97x against 0.96-0.99x offline, 1.01x against 1.05x at 16 concurrent requests
through the server).

So a step's proposals are trees when a verified token's measured price, as a share of a plain step's time per
row at the step's batch size, is below the measured acceptance of the nodes a tree adds: both come from the
engine's own steps (:class:`~.cost_model.CostModel`, :class:`~.acceptance.ProcessAcceptance`), none is a
constant of this machine. Before a batch size is priced the step proposes chains.
"""

from __future__ import annotations

from ouroboros_vllm.algorithm.adaptive import AdaptiveController
from ouroboros_vllm.algorithm.cost_model import CostModel

# The sources of the nodes a tree adds to the chain it would otherwise propose, and the rate they are taken at
# before any was examined: about what they measured on the real pair (10-20%, docs/benchmarks.md), not the
# process's neutral prior of 0.5, which let a server's first steps at batch 8 propose trees.
TREE_SOURCES = ("branch", "runner_up")
UNTRIED_RATE = 0.1


def token_share(costs: CostModel, rows: int) -> float | None:
    """What one more verified token adds to a step of ``rows`` rows, as a share of a plain step's time per row
    (what a row's emitted token costs without speculation); None before the target's step is measured."""
    target = costs.target_fit(rows)
    plain = costs.plain_cost(rows) or target
    if target is None or plain is None or rows <= 0:
        return None
    per_row = plain(rows) / rows
    return target.slope / per_row if per_row > 0 else None


def trees_pay(controller: AdaptiveController, rows: int) -> bool:
    """Whether a step of ``rows`` rows proposes trees: a verified token costs a smaller share of a row's plain
    step (:func:`token_share`, from ``controller``'s cost model) than the tree's added nodes are accepted,
    lately (the process-wide rate of the best of their sources)."""
    share = token_share(controller.costs, rows)
    return share is not None and share < tree_node_rate(controller)


def tree_node_rate(controller: AdaptiveController) -> float:
    """The process-wide acceptance of the nodes a tree adds, the best of their sources."""
    rates = controller.acceptance.rates
    return max(rates[source].rate(UNTRIED_RATE, prior_trials=1.0) for source in TREE_SOURCES)
