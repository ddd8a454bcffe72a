"""A projection, not a measurement: each mode's decode speed on a GPU, from its counts measured on real weights on
CPU and step costs measured on a GPU.

A CPU run at batch 1 (``benchmarks.run``, every method's ``drafter_stats``) says, per dataset and mode, how many
tokens were emitted (N), how many of them were accepted draft tokens (A), how many draft tokens the target verified
(V) and how many draft forwards ran (F). Those counts depend on the models' weights and the drafting, not on the
hardware (the adaptive planner's choices excepted: it chose them against CPU costs). On a GPU a decode step costs P
(plain), a verified draft token adds c, a draft forward costs D (``benchmarks.draft_forward``'s CUDA-graph figures),
so decoding takes

    plain:  N * P
    mode:   (N - A) * P + V * c + F * D       (every target step emits one token more than it accepted)

and the projected decode speedup is their ratio. Prefill is left out of both (speculation does not shorten it);
a prompt's catch-up forwards are counted at D although they are wider. The oracle (K tokens a step, every one
accepted, drafting free) is ``(K + 1) * P / (P + K * c)``.

  python -m benchmarks.gpu_projection --acceptance-run docs/benchmarks/b1-s8/results.json \\
      --plain-step 0.0236 --draft-forward 0.00395 --out projection.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.ceiling import runs_by_dataset
from benchmarks.report import markdown_table


@dataclass(frozen=True)
class Counts:
    """One mode's decoding on one dataset: emitted, accepted and verified tokens, draft forwards."""

    emitted: int
    accepted: int
    verified: int
    forwards: int

    @classmethod
    def of_run(cls, run: dict[str, Any]) -> Counts | None:
        stats = run.get("drafter_stats")
        if not stats or not stats.get("rounds"):
            return None
        return cls(
            run["num_output_tokens"], stats["accepted_tokens"], stats["verified_tokens"], stats["draft_forwards"]
        )


@dataclass(frozen=True)
class GpuCosts:
    plain_step: float  # seconds of a plain decode step
    token: float  # seconds a verified draft token adds to a step
    forward: float  # seconds of one draft forward

    def plain_seconds(self, counts: Counts) -> float:
        return counts.emitted * self.plain_step

    def mode_seconds(self, counts: Counts) -> float:
        steps = counts.emitted - counts.accepted
        return steps * self.plain_step + counts.verified * self.token + counts.forwards * self.forward

    def oracle_speedup(self, k: int) -> float:
        return (k + 1) * self.plain_step / (self.plain_step + k * self.token)


def project(path: Path, costs: GpuCosts) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per (dataset, mode) the projected decode speedup, and per mode the pooled one (total plain time over total
    mode time, so datasets weigh by the tokens they emitted)."""
    rows, plain_total, mode_total = [], {}, {}
    for dataset, methods in runs_by_dataset(path, 1).items():
        for method, run in methods.items():
            counts = Counts.of_run(run)
            if counts is None:
                continue
            plain, mode = costs.plain_seconds(counts), costs.mode_seconds(counts)
            plain_total[method] = plain_total.get(method, 0.0) + plain
            mode_total[method] = mode_total.get(method, 0.0) + mode
            rows.append({"dataset": dataset, "method": method, "speedup": plain / mode, **vars(counts)})
    return rows, {method: plain_total[method] / mode_total[method] for method in plain_total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_projection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--acceptance-run", type=Path, required=True, help="a CPU results.json at batch 1")
    parser.add_argument("--plain-step", type=float, required=True, help="GPU: seconds of a plain decode step")
    parser.add_argument("--draft-forward", type=float, required=True, help="GPU: seconds of one draft forward")
    parser.add_argument("--token", type=float, default=0.0, help="GPU: seconds a verified draft token adds")
    parser.add_argument("-k", type=int, default=4, help="the oracle's tokens a step")
    parser.add_argument("--out", type=Path, default=None, help="write the projection as JSON here")
    args = parser.parse_args(argv)

    costs = GpuCosts(args.plain_step, args.token, args.draft_forward)
    rows, pooled = project(args.acceptance_run, costs)
    if not rows:
        parser.error(f"{args.acceptance_run} has no batch-1 run with drafter statistics")
    methods = sorted(pooled)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    speedup = {(row["dataset"], row["method"]): row["speedup"] for row in rows}
    print(f"PROJECTION (decode only, batch 1): plain step {1000 * costs.plain_step:.1f} ms, draft forward "
          f"{1000 * costs.forward:.2f} ms, verified token {1000 * costs.token:.2f} ms; "
          f"oracle at K={args.k}: {costs.oracle_speedup(args.k):.2f}x")  # fmt: skip
    cells = [[d] + [f"{speedup[d, m]:.2f}x" if (d, m) in speedup else "" for m in methods] for d in datasets]
    cells.append(["pooled"] + [f"{pooled[m]:.2f}x" for m in methods])
    print(markdown_table(("dataset", *methods), cells))
    if args.out is not None:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        result = {"projection": True, "settings": settings, "oracle": costs.oracle_speedup(args.k)}
        args.out.write_text(json.dumps(result | {"rows": rows, "pooled": pooled}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
