"""PNG plots of a benchmark run (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.metrics import ALL_DATASETS, BASELINE, Summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def speedup_by_dataset(
    summaries: Sequence[Summary],
    path: Path,
    *,
    k: int,
    batch_size: int,
    methods: Sequence[str],
    datasets: Sequence[str],
    title: str,
) -> Path:
    """Grouped bars: one group per dataset (and all pooled), one bar per speculative method at ``k``."""
    plt = _pyplot()
    groups = [*datasets, ALL_DATASETS]
    table = {
        (s.method, s.dataset): s.speedup
        for s in summaries
        if s.batch_size == batch_size and s.k == k and s.status == "ok"
    }
    ran = {method for method, _ in table}
    bars = [m for m in methods if m != BASELINE and m in ran]
    not_run = [m for m in methods if m != BASELINE and m not in ran]
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(groups) + 4), 4.0))
    for i, method in enumerate(bars):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        ys = [table.get((method, d)) or 0.0 for d in groups]
        container = ax.bar(xs, ys, width, label=method)
        ax.bar_label(container, fmt="%.2f", fontsize=6, padding=1, rotation=90)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("speedup over plain (tokens/s)")
    ax.margins(y=0.12)  # room for the value labels
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars stay readable
    if not_run:
        ax.annotate(f"not run: {', '.join(not_run)}", (0.0, -0.01), xycoords="figure fraction", fontsize=7, va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tau_vs_k(
    summaries: Sequence[Summary],
    path: Path,
    *,
    batch_size: int,
    methods: Sequence[str],
    title: str,
) -> Path:
    """tau (left) and speedup (right) against K, all datasets pooled, one line per speculative method."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for method in methods:
        if method == BASELINE:
            continue
        points = sorted(
            (s.k, s.tau, s.speedup)
            for s in summaries
            if s.method == method
            and s.dataset == ALL_DATASETS
            and s.batch_size == batch_size
            and s.status == "ok"
            and s.k is not None
            and s.tau is not None
        )
        if not points:
            continue
        ks = [p[0] for p in points]
        left.plot(ks, [p[1] for p in points], marker="o", label=method)
        right.plot(ks, [p[2] or 0.0 for p in points], marker="o", label=method)
    all_ks = sorted({s.k for s in summaries if s.k is not None})
    left.plot(all_ks, [k + 1 for k in all_ks], color="grey", linestyle=":", label="K + 1 (every draft accepted)")
    left.set_xlabel("K (tokens proposed per step)")
    left.set_ylabel("τ (tokens per verifying target step)")
    right.set_xlabel("K (tokens proposed per step)")
    right.set_ylabel("speedup over plain")
    right.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    for ax in (left, right):
        ax.set_xticks(all_ks)
    left.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
