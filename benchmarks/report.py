"""The benchmark's Markdown report: a header saying what ran where, the pooled table, the per-dataset table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from benchmarks.metrics import ALL_DATASETS, BASELINE, Summary
from ouroboros_vllm.algorithm.stats import DraftStats

_COUNTED = {f.name for f in fields(DraftStats)} - {"accepted_rank"}  # the counts the table reads are plain numbers

COLUMNS = (
    "method",
    "K",
    "batch",
    "prompts",
    "tokens",
    "tok/s",
    "speedup",
    "decode speedup",
    "τ",
    "acceptance",
    "draft share",
    "draft ms/step",
    "output = plain",
)


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def lossless_cell(row: Summary) -> str:
    if row.method == BASELINE:
        return "reference"
    if not row.compared:
        return "not checked"
    if row.mismatched:
        # Loud on purpose: for greedy decoding any difference is a bug.
        return f"**NO: {len(row.mismatched)}/{row.compared} DIFFER**"
    return f"yes ({row.compared}/{row.compared})"


def row_cells(row: Summary) -> list[str]:
    k = "—" if row.k is None else str(row.k)
    if row.status != "ok":
        return [row.method, k, "—", "—", "—", f"{row.status}: {row.note}", *([""] * (len(COLUMNS) - 6))]
    return [
        row.method,
        k,
        str(row.batch_size),
        str(row.num_prompts),
        str(row.output_tokens),
        _num(row.tokens_per_second, ".2f"),
        _num(row.speedup, ".2f", "x"),
        _num(row.decode_speedup, ".2f", "x"),
        _num(row.tau, ".2f"),
        _num(None if row.acceptance_rate is None else 100 * row.acceptance_rate, ".0f", "%"),
        _num(None if row.draft_share is None else 100 * row.draft_share, ".0f", "%"),
        _num(row.draft_ms_per_step, ".0f"),
        lossless_cell(row),
    ]


POOL_COLUMNS = (
    "method",
    "batch",
    "τ",
    "pool tokens",
    "pool accepted",
    "context-matched accepted",
    "key-only accepted: first path / alternatives",
    "trees / proposals that could be trees",
    "branch tokens / tree",
    "branch tokens accepted",
    "alternative taken",
    "accepted candidate by rank",
)


def _share(part: float, whole: float) -> str:
    return f"{part:.0f}/{whole:.0f} ({100 * part / whole:.0f}%)" if whole else "—"


def key_only_cell(d: dict[str, Any]) -> str:
    """Accepted of proposed pool tokens from key-only phrases, on the first path and on alternative branches (the
    key-only ones that are not on the first path); "—" for a run that predates the first-path counter."""
    if "first_path_key_only_tokens" not in d:
        return "—"
    first, first_taken = d["first_path_key_only_tokens"], d.get("first_path_key_only_accepted_tokens", 0)
    key_only = d.get("suffix_tokens", 0) - d.get("matched_suffix_tokens", 0)
    key_only_taken = d.get("suffix_accepted_tokens", 0) - d.get("matched_suffix_accepted_tokens", 0)
    return f"{_share(first_taken, first)} / {_share(key_only_taken - first_taken, key_only - first)}"


def pool_cells(row: Summary) -> list[str]:
    """Where our accepted tokens came from: pool suffixes (all, and context-matched), and draft trees."""
    d = row.drafter
    trees = d.get("tree_rounds", 0)
    ranks = d.get("accepted_rank") or {}
    return [
        row.method,
        str(row.batch_size),
        _num(row.tau, ".2f"),
        str(d.get("suffix_tokens", 0)),
        _share(d.get("suffix_accepted_tokens", 0), d.get("suffix_tokens", 0)),
        _share(d.get("matched_suffix_accepted_tokens", 0), d.get("matched_suffix_tokens", 0)),
        key_only_cell(d),
        f"{trees} / {d.get('tree_choice_rounds', 0)}",
        _num(d.get("branch_tokens", 0) / trees if trees else None, ".2f"),
        _share(d.get("branch_accepted_tokens", 0), d.get("branch_tokens", 0)),
        _share(d.get("branch_rounds", 0), trees),
        ", ".join(f"{rank}: {ranks[rank]}" for rank in sorted(ranks, key=int)) or "—",
    ]


DRAFT_COLUMNS = (
    "dataset",
    "method",
    "batch",
    "draft forwards / step",
    "ms / draft forward",
    "trunk tokens / forward",
    "rounds with phrases",
)


def draft_cells(row: Summary) -> list[str]:
    """How our draft model drafted: how many forwards a step, what each cost, how many trunk tokens each emitted
    (more than one where the pool's phrases rode along), and how many rounds carried phrases."""
    d = row.drafter
    stats = DraftStats(**{name: d[name] for name in _COUNTED if name in d})  # the proposer's own counters
    forwards = stats.draft_forwards
    return [
        row.dataset,
        row.method,
        str(row.batch_size),
        _num(forwards / stats.steps if stats.steps else None, ".2f"),
        _num(1000 * stats.draft_seconds / forwards if forwards else None, ".1f"),
        _num(stats.tokens_per_draft_forward if forwards else None, ".2f"),
        _share(stats.phrase_rounds, stats.rounds) if "phrase_rounds" in d else "—",  # not counted before 2026-11-30
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def sort_rows(rows: Sequence[Summary], method_order: Sequence[str], dataset_order: Sequence[str]) -> list[Summary]:
    def key(row: Summary) -> tuple:
        dataset_rank = dataset_order.index(row.dataset) if row.dataset in dataset_order else len(dataset_order)
        method_rank = method_order.index(row.method) if row.method in method_order else len(method_order)
        # Rows of methods that did not run (no batch size) go last.
        batch_rank = row.batch_size if row.batch_size is not None else float("inf")
        return (dataset_rank, batch_rank, method_rank, row.k or 0)

    return sorted(rows, key=key)


def render(
    summaries: Sequence[Summary],
    *,
    title: str,
    description: Sequence[str],
    method_order: Sequence[str],
    dataset_order: Sequence[str],
    mismatches: Sequence[str] = (),
    plots: Sequence[str] = (),
) -> str:
    """The whole report: ``description`` lines first, a loud banner when outputs differ, then the tables."""
    out = [f"# {title}", "", *description, ""]
    if mismatches:
        out += ["> **LOSSLESS CHECK FAILED: outputs differ from plain greedy decoding (a bug for greedy).**", ">"]
        out += [f"> - {line}" for line in mismatches]
        out.append("")
    pooled = sort_rows([s for s in summaries if s.dataset == ALL_DATASETS], method_order, dataset_order)
    out += ["## All datasets pooled", "", markdown_table(COLUMNS, [row_cells(r) for r in pooled]), ""]
    per_dataset = sort_rows([s for s in summaries if s.dataset != ALL_DATASETS], method_order, dataset_order)
    per_dataset_rows = [[r.dataset, *row_cells(r)] for r in per_dataset]
    out += ["## Per dataset", "", markdown_table(("dataset", *COLUMNS), per_dataset_rows), ""]
    ours = [r for r in pooled if r.drafter.get("suffix_tokens")]
    if ours:
        out += [
            "## Pool suffixes and draft trees (all datasets pooled)",
            "",
            "Pool tokens: proposed from the phrase pool (a tree's alternative branches included); context-matched: "
            "from phrases that matched more of the chain's end than their key (key-only: the rest, on the first path "
            "or on an alternative branch); rank 0 is the first path's suffix.",
            "",
            markdown_table(POOL_COLUMNS, [pool_cells(r) for r in ours]),
            "",
        ]
    drafting = [r for r in per_dataset if r.drafter.get("draft_forwards")]
    if drafting:
        out += [
            "## The draft model's forwards (ours, per dataset)",
            "",
            "A forward's time includes the rounds' bookkeeping and the catch-ups it carries (a prompt's, at first).",
            "",
            markdown_table(DRAFT_COLUMNS, [draft_cells(r) for r in drafting]),
            "",
        ]
    if plots:
        out += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(out)


def describe_run(meta: dict[str, Any]) -> list[str]:
    """The report's header lines from the run's metadata."""
    from benchmarks.environment import summary_line

    lines = [
        f"- mode: **{meta['mode']}**" + (" (a quick check, not the full benchmark)" if meta["mode"] == "quick" else ""),
        f"- target `{meta['target_name']}`, draft `{meta['draft_name']}`, greedy (temperature 0), fp32, "
        f"K = {', '.join(str(k) for k in meta['ks'])}, batch sizes {', '.join(str(b) for b in meta['batch_sizes'])}",
        f"- machine: {summary_line(meta['machine'])}; load average at start {meta['machine'].get('load_average')}, "
        f"at end {meta.get('load_average_end')}",
        f"- started {meta['started']}, "
        + (
            f"took {meta['elapsed_s'] / 60:.1f} min"
            if "elapsed_s" in meta
            else "stopped before the end (the methods that finished are below)"
        )
        + f"; command: `{meta['command']}`",
    ]
    if meta.get("paired"):
        lines.append(
            "- paired (`--paired`): each method took turns with a plain engine of its own, dataset by dataset; its "
            "speedups are against that engine (plain's row: the first pair to run each dataset)"
        )
    for name, info in meta.get("datasets", {}).items():
        prompts = f"{info['num_prompts']} prompt" + ("s" if info["num_prompts"] != 1 else "")
        by_batch = info.get("num_prompts_by_batch_size", {})
        if len(set(by_batch.values())) > 1:
            prompts += " (" + ", ".join(f"{n} at batch size {b}" for b, n in by_batch.items()) + ")"
        lines.append(
            f"- {name}: {prompts}, {info['max_tokens']} new tokens max, "
            f"prompt length {info['prompt_tokens_min']}-{info['prompt_tokens_max']} tokens"
        )
    return lines
