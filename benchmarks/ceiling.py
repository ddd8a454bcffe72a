"""What speculation can gain at a batch size, given the draft's measured acceptance and the measured step costs.

The oracle (``benchmarks/oracle.py``) is the ceiling when every proposed token is accepted and drafting is free.
This is the ceiling for a real draft: per dataset, the best fixed trunk depth d for rows whose draft tokens are
accepted at a per-token rate alpha, with every decision right and every catch-up (the draft reading a prompt)
free. Per emitted token of a row, a step costs

    plain:  t_p = P                                         (P: a plain step, all rows emit 1 token)
    draft:  t(d) = (P + rows*d*c + d*D) / (1 + alpha + ... + alpha^d)
    oracle: t_o = (P + rows*K*c) / (K + 1)

(c: a verified token's price at this batch size; D: one draft forward over the rows). The draft saves
``f = (t_p - min_d t(d)) / (t_p - t_o)`` of what the oracle saves per token, so the wall-clock ceiling of a
dataset is the plain run's time less f times the oracle's measured saving on it (prefill, which speculation does
not shorten, stays in both). It is a model, not a measurement: its inputs are.

alpha comes from a run of the fixed draft-model mode (``ouroboros-greedy``: every round drafts gamma tokens),
solved from its accepted tokens per round; plain's and the oracle's times from a run that has both at the batch
size.

  python -m benchmarks.ceiling --oracle-run docs/benchmarks/full/results.json \\
      --acceptance-run docs/benchmarks/b1-s7/results.json --batch-size 8 --plain-step 0.23 --token 0.016
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.report import markdown_table


def accepted_per_round(alpha: float, depth: int) -> float:
    """Expected accepted tokens of a ``depth``-token trunk at per-token acceptance ``alpha``."""
    return sum(alpha**i for i in range(1, depth + 1))


def solve_alpha(accepted: float, depth: int) -> float:
    """The per-token acceptance whose ``depth``-token trunks accept ``accepted`` tokens on average (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if accepted_per_round(middle, depth) < accepted else (low, middle)
    return (low + high) / 2


def best_depth(alpha: float, rows: int, k: int, plain_step: float, token: float, forward: float) -> tuple[int, float]:
    """(depth, seconds per emitted token of a row) of the best fixed depth 0..k."""
    options = [
        (d, (plain_step + rows * d * token + d * forward) / (1 + accepted_per_round(alpha, d))) for d in range(k + 1)
    ]
    return min(options, key=lambda option: option[1])


def runs_by_dataset(path: Path, batch_size: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{dataset: {method: run}} of a results.json at ``batch_size``; a method timed beside a plain engine of its
    own (``--paired``) has that engine's run of the dataset under ``"paired_baseline"``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for result in data["results"]:
        paired = {
            run["dataset"]: run for run in result.get("paired_baseline_runs") or [] if run["batch_size"] == batch_size
        }
        for run in result["runs"]:
            if run["batch_size"] == batch_size:
                pair = {"paired_baseline": paired[run["dataset"]]} if run["dataset"] in paired else {}
                runs.setdefault(run["dataset"], {})[result["method"]] = run | pair
    return runs


def trunk_alphas(path: Path, method: str, gamma: int) -> dict[str, float]:
    """Per dataset, the per-token acceptance of ``method``'s trunks (every round ``gamma`` draft tokens)."""
    alphas = {}
    for dataset, methods in runs_by_dataset(path, 1).items():
        stats = methods.get(method, {}).get("drafter_stats")
        if stats and stats["rounds"]:
            accepted = (stats["accepted_tokens"] - stats["suffix_accepted_tokens"]) / stats["rounds"]
            alphas[dataset] = solve_alpha(accepted, gamma)
    return alphas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--oracle-run", type=Path, required=True, help="results.json with plain and oracle")
    parser.add_argument("--acceptance-run", type=Path, required=True, help="results.json with --method at batch 1")
    parser.add_argument("--method", default="ouroboros-greedy", help="a fixed-trunk method of the acceptance run")
    parser.add_argument("--gamma", type=int, default=4, help="that method's trunk tokens per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("-k", type=int, default=4, help="the oracle run's K")
    parser.add_argument("--plain-step", type=float, required=True, help="seconds of a plain step at the batch size")
    parser.add_argument("--token", type=float, required=True, help="seconds a verified token adds to a step")
    parser.add_argument("--forward", type=float, default=0.047, help="seconds of one draft forward over the rows")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)

    alphas = trunk_alphas(args.acceptance_run, args.method, args.gamma)
    rows, p = args.batch_size, args.plain_step
    oracle_token = (p + rows * args.k * args.token) / (args.k + 1)
    table, plain_total, ceiling_total, oracle_total = [], 0.0, 0.0, 0.0
    for dataset, methods in runs_by_dataset(args.oracle_run, args.batch_size).items():
        if dataset not in alphas or "plain" not in methods or "oracle" not in methods:
            continue
        depth, seconds = best_depth(alphas[dataset], rows, args.k, p, args.token, args.forward)
        share = (p - seconds) / (p - oracle_token)
        plain, oracle = methods["plain"]["wall_s"], methods["oracle"]["wall_s"]
        ceiling = plain - share * (plain - oracle)
        plain_total, ceiling_total, oracle_total = plain_total + plain, ceiling_total + ceiling, oracle_total + oracle
        table.append({"dataset": dataset, "alpha": alphas[dataset], "depth": depth, "decode_speedup": p / seconds,
                      "share_of_oracle": share, "ceiling": plain / ceiling, "oracle": plain / oracle})  # fmt: skip
    print(f"batch {rows}, K {args.k}: plain step {1000 * p:.0f} ms, verified token {1000 * args.token:.1f} ms, "
          f"draft forward {1000 * args.forward:.0f} ms")  # fmt: skip
    header = ("dataset", "alpha", "best depth", "decode per token", "share of the oracle's saving", "ceiling", "oracle")
    cells = [
        [row["dataset"], f"{row['alpha']:.2f}", str(row["depth"]), f"{row['decode_speedup']:.2f}x",
         f"{row['share_of_oracle']:.0%}", f"{row['ceiling']:.2f}x", f"{row['oracle']:.2f}x"]
        for row in table
    ]  # fmt: skip
    pooled = {"ceiling": plain_total / ceiling_total, "oracle": plain_total / oracle_total} if table else None
    if pooled is not None:
        cells.append(["pooled", "", "", "", "", f"{pooled['ceiling']:.2f}x", f"{pooled['oracle']:.2f}x"])
    print(markdown_table(header, cells))
    if pooled is not None and args.out is not None:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        args.out.write_text(
            json.dumps({"settings": settings, "datasets": table, "pooled": pooled}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
