"""How well the draft model's probabilities predict the target's verdicts, and what trees shaped by them gain.

Tree verification spends its node budget by the draft's probabilities (docs/design.md, "Where the nodes go"): a
trunk token is worth the calibrated chance that the target takes it and every one before it, the draft's second
choice beside a doubtful token the chance that it is the target's instead. That is only as good as the draft's
calibration for this target on this text. This tool measures it: one forward of the draft over each prompt and
its plain output (a benchmark run's ``references.json``, as :mod:`benchmarks.policy_replay` reads it) gives, at
every output position, the draft's probability of its first choice, whether that is plain's token, and the same
for its second choice; kept beside the run as ``draft-probs-<draft>-<precision>.json``.

Then batch size 1 is replayed (greedy: acceptance is decided by the text alone) with K nodes a step, as a chain
of K trunk tokens and as a tree shaped by the plugin's own code (:func:`~ouroboros_vllm.algorithm.proposal.
lengthen_tree` over the trunk and second choices, :func:`~ouroboros_vllm.algorithm.proposal.trunk_may_grow`
stopping the drafting, the chances from a :class:`~ouroboros_vllm.algorithm.acceptance.ProbabilityCalibration`
learning as the replay goes). Exact for what the target accepts; the tree's shape past the first wrong token
uses the draft's probabilities given plain's prefix (the draft, drafting, sees its own wrong token there), and
the pool is left out. The speed column prices a step with :class:`benchmarks.policy_replay.StepCosts` (a
target step, and each draft forward, at one row).

  python -m benchmarks.draft_calibration --run docs/benchmarks/b8-paired-s10-new -k 4 8
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.policy_replay import StepCosts, draft_logits, load_run, run_models, run_parser
from ouroboros_vllm.algorithm.acceptance import PROBABILITY_EDGES, ProbabilityCalibration
from ouroboros_vllm.algorithm.proposal import Proposal, TreeRates, lengthen_tree, trunk_may_grow


@dataclass(frozen=True)
class Positions:
    """One reference's output, position by position, as the draft sees it given plain's prefix."""

    dataset: str
    first_prob: tuple[float, ...]  # the draft's probability of its first choice
    second_prob: tuple[float, ...]  # and of its second
    first_right: tuple[bool, ...]  # whether the first choice is plain's token
    second_right: tuple[bool, ...]  # whether the second is


def record(refs: Sequence[dict[str, Any]], draft: str, precision: str, target: str) -> list[dict[str, Any]]:
    """The draft's two likeliest tokens and their probabilities at every output position of every reference."""
    import torch

    records = []
    for ref, logits in zip(refs, draft_logits(refs, draft, precision, target, "draft probabilities"), strict=True):
        top = logits.softmax(-1).topk(2, dim=-1)
        truth = torch.tensor(ref["output_token_ids"])[:, None]
        records.append({
            "dataset": ref["dataset"],
            "first_prob": top.values[:, 0].tolist(),
            "second_prob": top.values[:, 1].tolist(),
            "first_right": (top.indices[:, :1] == truth)[:, 0].tolist(),
            "second_right": (top.indices[:, 1:] == truth)[:, 0].tolist(),
        })  # fmt: skip
    return records


def positions(run_dir: Path, draft: str, precision: str, target: str) -> list[Positions]:
    """The run's references as the draft sees them, recorded once into a file beside them."""
    cache = run_dir / f"draft-probs-{Path(draft).name}-{precision}.json"
    if not cache.exists():
        cache.write_text(json.dumps(record(load_run(run_dir), draft, precision, target)))
    return [Positions(r["dataset"], *(tuple(r[name]) for name in list(Positions.__dataclass_fields__)[1:]))
            for r in json.loads(cache.read_text())]  # fmt: skip


def calibration_table(refs: Sequence[Positions]) -> list[dict[str, float]]:
    """Per bin of the draft's first-choice probability: tokens, the fraction plain agreed with, the mean
    probability, and how often the second choice was plain's token where the first was not."""
    first = np.concatenate([r.first_prob for r in refs])
    right = np.concatenate([r.first_right for r in refs]).astype(bool)
    second_right = np.concatenate([r.second_right for r in refs]).astype(bool)
    rows = []
    for low, high in itertools.pairwise(PROBABILITY_EDGES):
        inside = (first >= low) & ((first < high) if high < 1.0 else (first <= high))
        wrong = inside & ~right
        if inside.any():
            second = float(second_right[wrong].mean()) if wrong.any() else 0.0
            rows.append({"from": low, "to": high, "tokens": int(inside.sum()),
                         "accepted": float(right[inside].mean()), "mean_probability": float(first[inside].mean()),
                         "second_right_when_first_wrong": second})  # fmt: skip
    return rows


@dataclass
class Tally:
    steps: int = 0
    accepted: int = 0
    forwards: int = 0
    second_choices_taken: int = 0
    tokens: int = 0  # plain's decode steps over the same outputs

    def tau(self) -> float:
        return (self.accepted + self.steps) / max(self.steps, 1)

    def speedup(self, costs: StepCosts) -> float:
        return self.tokens * costs.plain_1 / (self.steps * costs.plain_1 + self.forwards * costs.draft(1))


def replay(refs: Sequence[Positions], k: int, tree: bool) -> Tally:
    """Batch size 1, K = ``k`` nodes a step: a chain of ``k`` trunk tokens, or the plugin's tree (see the module
    docstring). One calibration learns over all of ``refs`` in order, as a process's does."""
    # The trunk rate stands in for the next token's chance in the stopping rule: here a running rate of the trunk's
    # examined tokens (the plugin's is the request's, leaning on the process's).
    tally, first_cal, second_cal, trunk_rate = Tally(), ProbabilityCalibration(), ProbabilityCalibration(), 0.8
    for ref in refs:
        emitted = 1  # the prefill's token
        tally.tokens += len(ref.first_right) - 1
        while emitted < len(ref.first_right):
            depth = min(k, len(ref.first_right) - emitted - 1)
            at = range(emitted, emitted + depth)
            chances = [first_cal.chance(ref.first_prob[t]) for t in at]
            seconds = {i: second_cal.chance(ref.second_prob[t]) for i, t in enumerate(at)}
            drafted = depth
            if tree:  # the round stops once a deeper token could not be proposed, as the plugin's does
                drafted = next((d for d in range(1, depth) if not trunk_may_grow(chances[:d], seconds, k, trunk_rate)),
                               depth)  # fmt: skip
                seconds = {i: c for i, c in seconds.items() if i < drafted}
            tokens = list(range(drafted))  # node i holds trunk position i; a second choice holds -1 - i
            proposal = Proposal(tokens=tokens, trunk_len=drafted)
            if tree:
                runner_ups = {i: -1 - i for i in range(drafted)}
                lengthen_tree(None, proposal, [0], k, 1, TreeRates(trunk_rate, 0.0, 0.0, 0.0, 0.0), runner_ups,
                              chances[:drafted], seconds)  # fmt: skip
            trunk = proposal.trunk_len
            agreed = next((i for i in range(trunk) if not ref.first_right[emitted + i]), trunk)
            # The target reaches trunk position ``agreed``: the second choice there is taken if it is plain's token.
            taken = int(-1 - agreed in proposal.tokens and ref.second_right[emitted + agreed])
            examined = range(emitted, emitted + min(agreed + 1, trunk))
            first_cal.record([ref.first_prob[t] for t in examined], [ref.first_right[t] for t in examined])
            reached = [-1 - i for i in range(agreed + 1)]
            if tree:
                tried = [t for t in proposal.tokens[trunk:] if t in reached]
                second_cal.record([ref.second_prob[emitted - 1 - t] for t in tried],
                                  [ref.second_right[emitted - 1 - t] for t in tried])  # fmt: skip
            trunk_rate = 0.9 * trunk_rate + 0.1 * (agreed / max(min(agreed + 1, trunk), 1))
            tally.steps += 1
            tally.forwards += drafted
            tally.accepted += agreed + taken
            tally.second_choices_taken += taken
            emitted += agreed + taken + 1
    return tally


def compare(refs: Sequence[Positions], ks: Sequence[int], costs: StepCosts) -> list[dict[str, Any]]:
    """Chain against tree at each K, per dataset and pooled."""
    groups = {name: [r for r in refs if r.dataset == name] for name in dict.fromkeys(r.dataset for r in refs)}
    groups["pooled"] = list(refs)
    results = []
    for k in ks:
        for name, group in groups.items():
            for shape in ("chain", "tree"):
                tally = replay(group, k, shape == "tree")
                results.append({"k": k, "dataset": name, "shape": shape, "tau": tally.tau(),
                                "speedup": tally.speedup(costs), **asdict(tally)})  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = run_parser("python -m benchmarks.draft_calibration", __doc__)
    parser.add_argument("-k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.k):
        parser.error("-k takes node budgets of at least 1")
    draft, target = run_models(parser, args)
    refs = positions(args.run, draft, args.precision, target)
    table = calibration_table(refs)
    print("| draft's probability | tokens | plain agreed | mean probability | second choice right, first wrong |")
    print("|---|---|---|---|---|")
    for row in table:
        print(f"| {row['from']:.2f}-{row['to']:.2f} | {row['tokens']} | {row['accepted']:.3f} | "
              f"{row['mean_probability']:.3f} | {row['second_right_when_first_wrong']:.3f} |")  # fmt: skip
    results = compare(refs, args.k, StepCosts())
    print("\n| K | dataset | τ chain | τ tree | forwards/step chain | tree | speedup chain | tree |")
    print("|---|---|---|---|---|---|---|---|")
    for chain, tree in zip(results[::2], results[1::2], strict=True):
        print(f"| {chain['k']} | {chain['dataset']} | {chain['tau']:.2f} | {tree['tau']:.2f} | "
              f"{chain['forwards'] / chain['steps']:.2f} | {tree['forwards'] / tree['steps']:.2f} | "
              f"{chain['speedup']:.2f}x | {tree['speedup']:.2f}x |")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps({"args": vars(args) | {"run": str(args.run), "out": str(args.out)},
                                        "calibration": table, "results": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
