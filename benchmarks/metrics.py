"""From the workers' raw results to one summary row per method, K, dataset and batch size.

Definitions (docs/benchmarks.md explains them):
- tok/s: output tokens / wall seconds of the timed ``generate`` calls (prefill included; engine start and
  warm-up excluded).
- speedup: tok/s over ``plain``'s tok/s on the same dataset and batch size, in the same run.
- decode speedup: the same over the decode window only (first token to last token of each batch), which
  leaves out prefill, the part speculation cannot speed up.
- tau: vLLM's mean acceptance length, 1 + accepted draft tokens / drafts (tokens per target step that
  verified a draft).
- acceptance: accepted / proposed draft tokens.
- draft share: the drafter's own time / wall time (ours and the oracle; vLLM's drafters do not report it).
- draft ms/step: the drafter's time per engine step that drafted (ours).
- lossless: every output equals ``plain``'s at the same batch size, token for token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

BASELINE = "plain"
ALL_DATASETS = "all"


@dataclass
class Summary:
    method: str
    k: int | None
    dataset: str
    batch_size: int | None
    status: str = "ok"  # ok | unavailable | error
    note: str | None = None
    num_prompts: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float | None = None
    num_drafts: int | None = None
    num_draft_tokens: int | None = None
    num_accepted_tokens: int | None = None
    draft_seconds: float | None = None
    draft_steps: int | None = None  # engine steps that drafted (ours)
    speedup: float | None = None
    decode_speedup: float | None = None
    mismatched: list[str] = field(default_factory=list)  # prompt ids whose output differs from plain's
    compared: int = 0  # prompts checked against plain
    drafter: dict[str, Any] = field(default_factory=dict)  # our drafter's counters (DraftStats), summed over runs

    @property
    def tokens_per_second(self) -> float | None:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else None

    @property
    def decode_tokens_per_second(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_s else None

    @property
    def tau(self) -> float | None:
        if not self.num_drafts:
            return None
        return 1.0 + (self.num_accepted_tokens or 0) / self.num_drafts

    @property
    def acceptance_rate(self) -> float | None:
        if not self.num_draft_tokens:
            return None
        return (self.num_accepted_tokens or 0) / self.num_draft_tokens

    @property
    def draft_share(self) -> float | None:
        if self.draft_seconds is None or self.wall_s <= 0:
            return None
        return self.draft_seconds / self.wall_s

    @property
    def draft_ms_per_step(self) -> float | None:
        if self.draft_seconds is None or not self.draft_steps:
            return None
        return 1000 * self.draft_seconds / self.draft_steps

    @property
    def lossless(self) -> bool:
        return not self.mismatched

    def add_run(self, run: dict[str, Any]) -> None:
        """Add one worker run (a dataset at a batch size) into this row."""
        self.num_prompts += len(run["prompts"])
        self.output_tokens += run["num_output_tokens"]
        self.wall_s += run["wall_s"]
        # The first token of each request comes from prefill; the decode window holds the others.
        self.decode_tokens += sum(max(len(p["output_token_ids"]) - 1, 0) for p in run["prompts"])
        if run.get("decode_window_s") is not None:
            self.decode_s = (self.decode_s or 0.0) + run["decode_window_s"]
        if run.get("spec") is not None:
            self.num_drafts = (self.num_drafts or 0) + run["spec"]["num_drafts"]
            self.num_draft_tokens = (self.num_draft_tokens or 0) + run["spec"]["num_draft_tokens"]
            self.num_accepted_tokens = (self.num_accepted_tokens or 0) + run["spec"]["num_accepted_tokens"]
        if run.get("draft_seconds") is not None:
            self.draft_seconds = (self.draft_seconds or 0.0) + run["draft_seconds"]
        steps = (run.get("drafter_stats") or {}).get("steps")
        if steps:
            self.draft_steps = (self.draft_steps or 0) + int(steps)
        for key, value in (run.get("drafter_stats") or {}).items():
            if isinstance(value, dict):  # a histogram (JSON turns its keys into strings: so do we)
                histogram = self.drafter.setdefault(key, {})
                for bucket, count in value.items():
                    histogram[str(bucket)] = histogram.get(str(bucket), 0) + count
            else:
                self.drafter[key] = self.drafter.get(key, 0) + value


def reference_outputs(results: Iterable[dict[str, Any]]) -> dict[tuple[str, int, str], list[int]]:
    """``(dataset, batch size, prompt id) -> output token ids`` of the plain run."""
    references: dict[tuple[str, int, str], list[int]] = {}
    for result in results:
        if result["method"] == BASELINE and result["status"] == "ok":
            for run in result["runs"]:
                for prompt in run["prompts"]:
                    references[(run["dataset"], run["batch_size"], prompt["id"])] = prompt["output_token_ids"]
    return references


def summarize(results: Sequence[dict[str, Any]]) -> list[Summary]:
    """Summary rows: per dataset, then pooled over all datasets (``dataset == "all"``), each with speedups vs plain.

    A method that did not run (unavailable, error) gets one row with its status and reason.
    """
    references = reference_outputs(results)
    rows: dict[tuple[str, int | None, str, int | None], Summary] = {}
    paired: dict[tuple[str, int | None], dict[tuple[str, int | None], Summary]] = {}
    for result in results:
        method, k = result["method"], result["k"]
        if result.get("paired_baseline_runs"):
            paired[(method, k)] = _baseline_rows(result["paired_baseline_runs"])
        if result["status"] != "ok":
            # An unavailable method is unavailable at every K: one row says so.
            k_shown = None if result["status"] == "unavailable" else k
            rows[(method, k_shown, ALL_DATASETS, None)] = Summary(
                method, k_shown, ALL_DATASETS, None, result["status"], result["reason"]
            )
            continue
        _add_runs(rows, method, k, result["runs"], references)
    summaries = list(rows.values())
    _add_speedups(summaries, paired)
    return summaries


def _add_runs(
    rows: dict[tuple[str, int | None, str, int | None], Summary],
    method: str,
    k: int | None,
    runs: list[dict[str, Any]],
    references: dict[tuple[str, int, str], list[int]] | None = None,
) -> None:
    """Add each run to its dataset's row and to the pooled row of ``rows`` (keyed (method, k, dataset, batch
    size)), its outputs checked against ``references`` when given."""
    for run in runs:
        for dataset in (run["dataset"], ALL_DATASETS):
            key = (method, k, dataset, run["batch_size"])
            row = rows.setdefault(key, Summary(method, k, dataset, run["batch_size"]))
            row.add_run(run)
            if references is not None:
                _check_outputs(row, run, references)


def _baseline_rows(runs: list[dict[str, Any]]) -> dict[tuple[str, int | None], Summary]:
    """A paired plain engine's runs as summaries by (dataset, batch size), pooled ones included."""
    rows: dict[tuple[str, int | None, str, int | None], Summary] = {}
    _add_runs(rows, BASELINE, None, runs)
    return {(dataset, batch_size): row for (_, _, dataset, batch_size), row in rows.items()}


def _check_outputs(row: Summary, run: dict[str, Any], references: dict[tuple[str, int, str], list[int]]) -> None:
    for prompt in run["prompts"]:
        expected = references.get((run["dataset"], run["batch_size"], prompt["id"]))
        if expected is None:
            continue
        row.compared += 1
        if prompt["output_token_ids"] != expected:
            row.mismatched.append(f"{run['dataset']}/{prompt['id']}")


def _add_speedups(
    summaries: list[Summary], paired: dict[tuple[str, int | None], dict[tuple[str, int | None], Summary]]
) -> None:
    """Each row's speedups against plain's row, or against its own plain engine's (a ``--paired`` run)."""
    baseline = {(s.dataset, s.batch_size): s for s in summaries if s.method == BASELINE and s.status == "ok"}
    for row in summaries:
        base = paired.get((row.method, row.k), baseline).get((row.dataset, row.batch_size))
        if base is None or row.status != "ok":
            continue
        if row.tokens_per_second and base.tokens_per_second:
            row.speedup = row.tokens_per_second / base.tokens_per_second
        if row.decode_tokens_per_second and base.decode_tokens_per_second:
            row.decode_speedup = row.decode_tokens_per_second / base.decode_tokens_per_second


def first_difference(expected: Sequence[int], actual: Sequence[int]) -> int:
    """Index of the first differing output token (the shorter length when one is a prefix of the other)."""
    for i, (a, b) in enumerate(zip(expected, actual, strict=False)):
        if a != b:
            return i
    return min(len(expected), len(actual))


def mismatch_details(results: Sequence[dict[str, Any]], limit: int = 10) -> list[str]:
    """Human-readable lines for outputs that differ from plain's (for the report and the console)."""
    references = reference_outputs(results)
    lines = []
    for result in results:
        if result["status"] != "ok" or result["method"] == BASELINE:
            continue
        for run in result["runs"]:
            for prompt in run["prompts"]:
                expected = references.get((run["dataset"], run["batch_size"], prompt["id"]))
                if expected is not None and prompt["output_token_ids"] != expected:
                    at = first_difference(expected, prompt["output_token_ids"])
                    lines.append(
                        f"{result['method']} K={result['k']} bs={run['batch_size']} {run['dataset']}/{prompt['id']}: "
                        f"differs from plain at output token {at} (plain {expected[at : at + 4]}, "
                        f"got {prompt['output_token_ids'][at : at + 4]})"
                    )
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])
