"""Speedups over several runs of the same methods, e.g. one in registry order and one with ``--reverse``.

A run's methods go one after another, minutes apart, and a small CPU's speed drifts by 10-20% over minutes, so a
method's speedup within one run carries whatever the machine did between plain's pass and its own. Two runs in
opposite orders (``python -m benchmarks.run ... --reverse``) put each method early once and late once; their
summed times cancel a drift that runs one way over both runs. Per dataset and pooled, each method's wall time
summed over the runs against plain's summed the same way, each run's own figure beside it (their spread shows
the drift). In a ``--paired`` run a method's plain is the plain engine that took turns with it.

  python -m benchmarks.combine RUN_DIR RUN_DIR --batch-size 1 --out combined.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.ceiling import runs_by_dataset
from benchmarks.methods import BASELINE
from benchmarks.report import markdown_table


def combine(paths: list[Path], batch_size: int) -> dict[str, Any]:
    """{"datasets": {dataset: {method: {"speedup", "runs"}}}, "pooled": {method: {"speedup", "runs"}}}: wall times
    summed over the runs (and, for "pooled", over the datasets every run has) against plain's."""
    runs = [runs_by_dataset(path, batch_size) for path in paths]
    datasets = [d for d in runs[0] if all(BASELINE in r.get(d, {}) for r in runs)]
    methods = sorted({m for r in runs for d in datasets for m in r[d]} - {BASELINE})
    walls = {  # (dataset, method) -> the wall time of each run
        (d, m): [r[d][m]["wall_s"] for r in runs] for d in datasets for m in methods if all(m in r[d] for r in runs)
    }
    # plain's beside each method: the method's own plain engine in a --paired run, else the run's plain
    bases = {(d, m): [r[d][m].get("paired_baseline", r[d][BASELINE])["wall_s"] for r in runs] for d, m in walls}
    table: dict[str, Any] = {"datasets": {}, "pooled": {}}
    for m in methods:
        shared = [d for d in datasets if (d, m) in walls]
        for d in shared:
            plain, mine = bases[d, m], walls[d, m]
            table["datasets"].setdefault(d, {})[m] = {
                "speedup": sum(plain) / sum(mine),
                "runs": [p / w for p, w in zip(plain, mine, strict=True)],
            }
        if shared:
            plain_runs = [sum(bases[d, m][i] for d in shared) for i in range(len(paths))]
            mine_runs = [sum(walls[d, m][i] for d in shared) for i in range(len(paths))]
            table["pooled"][m] = {
                "speedup": sum(plain_runs) / sum(mine_runs),
                "runs": [p / w for p, w in zip(plain_runs, mine_runs, strict=True)],
                "datasets": shared,
            }
    return table


def render(table: dict[str, Any]) -> str:
    methods = sorted(table["pooled"])

    def cell(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return ""
        return f"{entry['speedup']:.2f}x ({' / '.join(f'{s:.2f}' for s in entry['runs'])})"

    rows = [[d] + [cell(per.get(m)) for m in methods] for d, per in table["datasets"].items()]
    rows.append(["pooled"] + [cell(table["pooled"][m]) for m in methods])
    return markdown_table(("dataset", *methods), rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.combine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("runs", type=Path, nargs="+", help="results folders (or their results.json)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the combined figures as JSON here")
    args = parser.parse_args(argv)
    paths = [path / "results.json" if path.is_dir() else path for path in args.runs]
    table = combine(paths, args.batch_size)
    if not table["pooled"]:
        parser.error(f"no dataset has plain and another method at batch size {args.batch_size} in every run")
    print(f"batch {args.batch_size}, {len(paths)} runs: speedup of the summed times (each run's own in brackets)")
    print(render(table))
    if args.out is not None:
        head = {"runs": [str(p) for p in paths], "batch_size": args.batch_size}
        args.out.write_text(json.dumps(head | table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
