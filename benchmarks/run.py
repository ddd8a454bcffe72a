"""Benchmark speculative decoding methods against plain decoding, for one target/draft pair, in one invocation.

Methods: plain (the baseline; its outputs are the reference), vLLM's ngram, suffix and draft_model, ours
(ouroboros-<drafting mode>) and the oracle (proposes plain's own continuation: the ceiling for this engine, K
and machine). Each method runs in its own engine in a child process, over every dataset and batch size; the
parent tokenizes the prompts, runs the children one after another, checks that every output equals plain's
and writes results.json, report.md and PNG plots into --out.

  python -m benchmarks.run --quick          # about 6 minutes on an idle 2-core CPU
  python -m benchmarks.run                  # the full run: batch sizes 1 and 8, ~1 h 50 min on a 2-core CPU
  ouroboros-vllm bench ...                  # the same (from a source checkout)

The exit status is 1 when any output differs from plain's (a bug, for greedy decoding) or a method failed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import datasets as ds
from benchmarks.environment import describe_machine, load_average
from benchmarks.jobs import PROGRESS_PREFIX, DatasetJob, Job, PromptJob, read_result
from benchmarks.methods import BASELINE, METHODS, Method, select_methods, unavailable_reason

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
WARMUP_TEXT = "Write one sentence about the sea."


@dataclass(frozen=True)
class Profile:
    """Defaults of a run size; any option given on the command line wins."""

    name: str
    datasets: tuple[str, ...]
    num_prompts: int
    max_tokens: int | None  # None: each dataset's own (datasets.DATASETS)
    ks: tuple[int, ...]
    batch_sizes: tuple[int, ...]


# Budgets for a 2-core CPU where the 1.5B target decodes ~3 tokens/s plain (docs/benchmarks.md has the sums).
# Batch size 8 runs 8 prompts of each dataset (one full batch), batch size 1 runs 2 of those 8.
FULL = Profile("full", tuple(ds.DATASETS), num_prompts=2, max_tokens=None, ks=(4,), batch_sizes=(1, 8))
# Quick: every method still runs (it is a smoke test of the whole harness), so engine starts are most of its time.
QUICK = Profile("quick", ("humaneval", "mt_bench"), num_prompts=1, max_tokens=32, ks=(4,), batch_sizes=(1,))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    method_names = ", ".join(m.name for m in METHODS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small run (~6 min on 2 idle cores): {', '.join(QUICK.datasets)}, {QUICK.num_prompts} "
        f"prompt each, {QUICK.max_tokens} tokens",
    )
    parser.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"target model: a name of `ouroboros-vllm models list` or a folder (default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--draft",
        default=DEFAULT_DRAFT,
        help=f"draft model for draft_model and ouroboros, same tokenizer as the target (default {DEFAULT_DRAFT})",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"method names or patterns, e.g. 'ouroboros*' (default: all of {method_names}); plain always runs",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        metavar="DATASET",
        choices=list(ds.DATASETS),
        help=f"default: all of {', '.join(ds.DATASETS)}",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="folder with sanitized-mbpp.json and spec_bench_question.jsonl "
        "(default: ../shared/data beside the checkout, if it exists)",
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        help=f"prompts per dataset and batch size, spread evenly over "
        f"the dataset; a larger batch size runs one full batch (default {FULL.num_prompts}; quick "
        f"{QUICK.num_prompts})",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="new tokens per prompt for every dataset (default: per dataset, see docs/benchmarks.md)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=1536,
        help="skip items whose prompt is longer (default 1536; CPU prefill is slow)",
    )
    parser.add_argument(
        "-k",
        "--num-speculative-tokens",
        dest="ks",
        type=int,
        nargs="+",
        metavar="K",
        help="tokens proposed per step; several values run every speculative method at each "
        "(the tau-vs-K plot) (default 4)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        metavar="N",
        help=f"prompts per generate call (default {' '.join(map(str, FULL.batch_sizes))}; quick "
        f"{' '.join(map(str, QUICK.batch_sizes))})",
    )
    parser.add_argument(
        "--kv-cache-gib",
        type=float,
        help="KV cache per engine (default: what the longest prompts need at the largest batch size)",
    )
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="run the methods after plain in reverse order: two runs, one each way, cancel the machine's drift "
        "between the methods of a run (it moves by 10-20%% over minutes on a small CPU)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="time each method against a plain engine of its own, both alive in one worker and taking turns "
        "dataset by dataset (plain runs once per method; the machine's drift cancels within each pair)",
    )
    parser.add_argument("--out", type=Path, help="results folder (default results/<timestamp>)")
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="RESULTS_DIR",
        help="run nothing: write report.md and the plots again from RESULTS_DIR/results.json",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        data = json.loads((args.report_only / "results.json").read_text(encoding="utf-8"))
        return write_reports(args.report_only, data["meta"], data["results"])
    profile = QUICK if args.quick else FULL
    started = time.perf_counter()
    out: Path = args.out or Path("results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    target, target_name = resolve_model(args.target)
    draft, draft_name = resolve_model(args.draft) if args.draft else (None, None)
    methods = select_methods(args.methods)
    ks = list(args.ks or profile.ks)
    batch_sizes = list(args.batch_sizes or profile.batch_sizes)

    if min(batch_sizes) < 1:
        print("error: --batch-sizes: every batch size must be at least 1", file=sys.stderr)
        return 2
    dataset_jobs, dataset_info = load_prompts(args, profile, target, batch_sizes)
    if not dataset_jobs:
        print("error: no dataset to run", file=sys.stderr)
        return 2
    warmup = tokenize_raw(target, WARMUP_TEXT)
    max_model_len = (
        max(len(p.token_ids) for d in dataset_jobs for p in d.prompts)
        + max(d.max_tokens for d in dataset_jobs)
        + max(ks)
        + 1
    )
    kv_cache_gib = args.kv_cache_gib or kv_cache_gib_needed([target, draft], max_model_len, max(batch_sizes))

    meta: dict[str, Any] = {
        "mode": profile.name,
        "command": command_line(),
        "argv": sys.argv,
        "started": datetime.now().isoformat(timespec="seconds"),
        "target": target,
        "target_name": target_name,
        "draft": draft,
        "draft_name": draft_name,
        "ks": ks,
        "batch_sizes": batch_sizes,
        "methods": [m.name for m in methods],
        "datasets": dataset_info,
        "max_model_len": max_model_len,
        "kv_cache_gib": kv_cache_gib,
        "machine": describe_machine(),
    }
    references = (out / "references.json").resolve()
    jobs = plan_jobs(
        methods,
        ks,
        batch_sizes,
        target,
        draft,
        dataset_jobs,
        max_model_len,
        kv_cache_gib,
        warmup,
        references=str(references),
        reverse=args.reverse,
    )
    print(
        f"benchmark ({profile.name}): {target_name} / {draft_name}, methods {', '.join(m.name for m in methods)}, "
        f"K {ks}, batch sizes {batch_sizes}, datasets {', '.join(dataset_info)} -> {out}",
        flush=True,
    )

    meta["paired"] = args.paired
    results = run_jobs(jobs, out, meta, references, paired=args.paired)
    meta["elapsed_s"] = time.perf_counter() - started
    meta["load_average_end"] = load_average()
    write_results(out, meta, results)
    return write_reports(out, meta, results)


def command_line() -> str:
    program = "python -m benchmarks.run" if sys.argv[0].endswith("run.py") else Path(sys.argv[0]).name
    return " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])


# ------------------------------------------------------------------------------------------------- prompts


def resolve_model(name_or_path: str) -> tuple[str, str]:
    """(folder, display name) of a model given by ``ouroboros-vllm models`` name or by folder."""
    from ouroboros_vllm.tools import models

    if name_or_path in models.MODELS:
        return str(models.fetch(name_or_path)), name_or_path
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise SystemExit(f"error: {name_or_path} is neither a known model ({', '.join(models.MODELS)}) nor a folder")
    return str(path.resolve()), path.name


@functools.lru_cache(maxsize=2)
def _tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def tokenize_raw(model: str, text: str) -> list[int]:
    return list(_tokenizer(model)(text, add_special_tokens=True)["input_ids"])


def render_prompt(tokenizer: Any, prompt: ds.Prompt) -> list[int]:
    """Token ids of a prompt: chat prompts through the target's chat template (when it has one), others raw."""
    if prompt.chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt.text, add_special_tokens=True)["input_ids"])


def load_prompts(
    args: argparse.Namespace, profile: Profile, target: str, batch_sizes: list[int]
) -> tuple[list[DatasetJob], dict[str, Any]]:
    """Every selected dataset's prompts, tokenized for the target, too-long items dropped, then sampled evenly:
    ``num_prompts``, or the largest batch size when that is more (each batch size runs at least one full batch)."""
    names = list(args.datasets or profile.datasets)
    explicit = args.datasets is not None
    data_dir = args.data_dir or ds.default_data_dir(REPO_ROOT)
    num_prompts = args.num_prompts or profile.num_prompts
    tokenizer = _tokenizer(target)
    jobs, info = [], {}
    for name in names:
        spec = ds.DATASETS[name]
        try:
            items = spec.load(data_dir)
        except ds.DatasetError as error:
            if explicit:
                raise SystemExit(f"error: {name}: {error}") from None
            print(f"note: skipping {name}: {error}", file=sys.stderr)
            continue
        rendered = [(item, render_prompt(tokenizer, item)) for item in items]
        fitting = [(item, ids) for item, ids in rendered if len(ids) <= args.max_prompt_tokens]
        chosen = ds.select_evenly(fitting, max(num_prompts, *batch_sizes))
        max_tokens = args.max_tokens or profile.max_tokens or spec.max_tokens
        job = DatasetJob(name, max_tokens, [PromptJob(item.id, ids) for item, ids in chosen], num_prompts)
        jobs.append(job)
        lengths = [len(ids) for _, ids in chosen]
        info[name] = {
            "description": spec.description,
            "num_items": len(items),
            "skipped_too_long": len(rendered) - len(fitting),
            "num_prompts": len(chosen),
            "num_prompts_by_batch_size": {str(b): len(job.prompts_at(b)) for b in batch_sizes},
            "prompt_ids": [item.id for item, _ in chosen],
            "max_tokens": max_tokens,
            "prompt_tokens_min": min(lengths, default=0),
            "prompt_tokens_max": max(lengths, default=0),
        }
    return jobs, info


def kv_bytes_per_token(model: str) -> int:
    """fp32 K and V of one token over all layers, from the model's config.json."""
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * 4


def kv_cache_gib_needed(models: list[str | None], max_model_len: int, batch_size: int) -> float:
    """KV cache for ``batch_size`` sequences of ``max_model_len`` in every model (vLLM's draft_model takes the
    draft's cache out of the same budget), with a margin for block rounding; small, so that engines beside
    other work on the machine do not hold memory they never use."""
    per_token = sum(kv_bytes_per_token(m) for m in models if m)
    needed = per_token * max_model_len * batch_size * 1.25 + (64 << 20)
    return max(0.25, round(needed / (1 << 30), 2))


# ---------------------------------------------------------------------------------------------------- jobs


def plan_jobs(
    methods: list[Method],
    ks: list[int],
    batch_sizes: list[int],
    target: str,
    draft: str | None,
    datasets: list[DatasetJob],
    max_model_len: int,
    kv_cache_gib: float,
    warmup: list[int],
    references: str,
    reverse: bool = False,
) -> list[tuple[Method, Job]]:
    """Plain first (the others are checked against it, the oracle replays it), then each method at each K, in
    registry order or, with ``reverse``, the other way round.

    A stateful method (its cache or pool outlives requests) gets one engine per batch size, so the second batch
    size does not meet prompts it has already seen.
    """
    jobs = []
    for method in methods:
        for k in [None] if not method.speculative else ks:
            groups = [[b] for b in batch_sizes] if method.stateful else [batch_sizes]
            for group in groups:
                jobs.append(
                    (
                        method,
                        Job(
                            method.name,
                            k,
                            target,
                            draft,
                            group,
                            datasets,
                            max_model_len,
                            kv_cache_gib,
                            references if method.kind == "oracle" else None,
                            warmup,
                        ),
                    )
                )
    jobs.sort(key=lambda item: item[0].name != BASELINE)  # stable: registry order otherwise
    if reverse:
        first = sum(method.name == BASELINE for method, _ in jobs)
        jobs[first:] = jobs[first:][::-1]
    return jobs


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    # arctic-inference (suffix) registers a vLLM plugin written for older vLLM: allow-list ours only. Set for every
    # method so that all engines start under the same plugins.
    env.setdefault("VLLM_PLUGINS", "ouroboros")
    return env


def run_jobs(
    jobs: list[tuple[Method, Job]], out: Path, meta: dict[str, Any], references: Path, paired: bool = False
) -> list[dict[str, Any]]:
    """Run the jobs in order, plain first; with ``paired``, each method beside a plain engine of its own (see
    ``benchmarks.worker``), its result carrying that plain engine's runs as ``paired_baseline_runs``; plain's own
    result is then gathered from the pairs (and run alone first only where the oracle needs its outputs before
    it runs)."""
    from tqdm import tqdm

    _exit_on_sigterm()
    plain_job = next(job for method, job in jobs if method.name == BASELINE)
    plain_alone = not paired or any(method.kind == "oracle" for method, _ in jobs)
    plain: dict[str, Any] = {"method": BASELINE, "k": None, "status": "ok", "reason": None, "runs": []}
    results: list[dict[str, Any]] = [] if plain_alone else [plain]
    timed = [(method, job) for method, job in jobs if plain_alone or method.name != BASELINE]
    total = sum(job.num_units * (2 if method.warm else 1) for method, job in timed)
    if paired:
        total += sum(replace(plain_job, batch_sizes=job.batch_sizes).num_units for m, job in jobs if m.name != BASELINE)
    with tqdm(total=total, unit="prompt", dynamic_ncols=True) as bar:
        for index, (method, job) in enumerate(jobs):
            label = method.name if job.k is None else f"{method.name} K={job.k}"
            bar.set_description(label)
            stem = out / "jobs" / f"{index:02d}-{method.name}-k{job.k}"
            reason = unavailable_reason(method, job.draft)
            if method.name == BASELINE and not plain_alone:
                continue
            if reason is not None:
                result = {"method": method.name, "k": job.k, "status": "unavailable", "reason": reason, "runs": []}
                bar.update(job.num_units * (2 if method.warm else 1))
            elif method.name == BASELINE:
                if index != 0:
                    raise AssertionError("plain must run first")
                result = run_worker([job], stem, bar)[0]
            elif paired:
                baseline, result = run_worker([replace(plain_job, batch_sizes=job.batch_sizes), job], stem, bar)
                result["paired_baseline_runs"] = baseline["runs"] if baseline["status"] == "ok" else None
                if not plain_alone and _gather_plain(plain, baseline):
                    write_references(references, plain, job.datasets)
            else:
                result = run_worker([job], stem, bar)[0]
            result["load_average_after"] = load_average()
            results.append(result)
            tqdm.write(f"{label}: {describe_result(result)}")
            if method.name == BASELINE:
                if result["status"] != "ok":
                    write_results(out, meta, results)
                    raise SystemExit(f"error: the plain baseline failed ({result['reason']}); see {out / 'jobs'}")
                write_references(references, result, job.datasets)
            write_results(out, meta, results)  # after every job: a crash later keeps what ran
    return results


def _gather_plain(plain: dict[str, Any], baseline: dict[str, Any]) -> bool:
    """Add a pair's plain runs that ``plain`` lacks (a dataset at a batch size); whether any was added."""
    have = {(run["dataset"], run["batch_size"]) for run in plain["runs"]}
    new = [run for run in baseline["runs"] if (run["dataset"], run["batch_size"]) not in have]
    plain["runs"].extend(new)
    plain.setdefault("engine_start_s", baseline.get("engine_start_s", 0.0))
    if baseline["status"] != "ok" and not plain["runs"]:
        plain.update(status=baseline["status"], reason=baseline["reason"])
    return bool(new)


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that run_worker's cleanup stops the running child."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_worker(jobs: list[Job], stem: Path, bar: Any) -> list[dict[str, Any]]:
    """Run ``jobs`` in one ``python -m benchmarks.worker`` (one engine each); its output goes to ``<stem>.log``,
    progress to ``bar``. One result per job."""
    log_path = stem.with_suffix(".log")
    tags = [f".{i}" if len(jobs) > 1 else "" for i in range(len(jobs))]
    paths = [(stem.with_suffix(f"{tag}.job.json"), stem.with_suffix(f"{tag}.result.json")) for tag in tags]
    command = [sys.executable, "-m", "benchmarks.worker"]
    for job, (job_path, result_path) in zip(jobs, paths, strict=True):
        job.write(job_path)
        result_path.unlink(missing_ok=True)
        command += [str(job_path), str(result_path)]
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=worker_env()
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    bar.update(int(line[len(PROGRESS_PREFIX) :]))
                else:
                    log.write(line)
            process.wait()
        except BaseException:
            # Ctrl-C or an error here: do not leave an engine holding gigabytes behind.
            process.kill()
            process.wait()
            raise
    results = []
    for job, (_, result_path) in zip(jobs, paths, strict=True):
        if result_path.is_file():
            results.append({**read_result(result_path), "log": str(log_path)})
            continue
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        results.append(
            {
                "method": job.method,
                "k": job.k,
                "status": "error",
                "runs": [],
                "log": str(log_path),
                "reason": f"worker exited with status {process.returncode} without a result (killed for memory?); "
                f"last lines: {' | '.join(tail)}",
            }
        )
    return results


def write_references(path: Path, plain: dict[str, Any], datasets: list[DatasetJob]) -> None:
    """Plain's outputs keyed by prompt, for the oracle: one reference per prompt, from the smallest batch size
    that ran it (a prompt of batch size 8 only has its batch-8 output)."""
    from benchmarks.oracle import ReferenceIndex

    prompts = {(d.name, p.id): p.token_ids for d in datasets for p in d.prompts}
    outputs: dict[tuple[str, str], list[int]] = {}
    for run in sorted(plain["runs"], key=lambda run: run["batch_size"]):
        for p in run["prompts"]:
            outputs.setdefault((run["dataset"], p["id"]), p["output_token_ids"])
    ReferenceIndex.write(path, ((prompts[key], output) for key, output in outputs.items()))


def describe_result(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result['reason']}"
    tokens = sum(run["num_output_tokens"] for run in result["runs"])
    seconds = sum(run["wall_s"] for run in result["runs"])
    return (
        f"{tokens} tokens in {seconds:.1f} s ({tokens / seconds:.2f} tokens/s), "
        f"engine start {result['engine_start_s']:.0f} s"
    )


# ------------------------------------------------------------------------------------------------- outputs


def write_results(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1), encoding="utf-8")


def write_reports(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> int:
    """report.md and the plots; prints the pooled table; the exit status (1: outputs differ or a method failed)."""
    from benchmarks import plots, report
    from benchmarks.metrics import mismatch_details, summarize

    summaries = summarize(results)
    method_order = [m.name for m in METHODS]
    dataset_order = list(meta["datasets"])
    k0, bs0 = meta["ks"][0], min(meta["batch_sizes"])
    plot_names = []
    for bs in meta["batch_sizes"]:
        name = f"speedup_k{k0}_bs{bs}.png"
        plots.speedup_by_dataset(
            summaries,
            out / name,
            k=k0,
            batch_size=bs,
            methods=meta["methods"],
            datasets=dataset_order,
            title=f"{meta['target_name']}: speedup, K={k0}, batch {bs} ({meta['mode']} run)",
        )
        plot_names.append(name)
    if len(meta["ks"]) > 1:
        name = f"tau_vs_k_bs{bs0}.png"
        plots.tau_vs_k(
            summaries,
            out / name,
            batch_size=bs0,
            methods=meta["methods"],
            title=f"{meta['target_name']} / {meta['draft_name']}: all datasets, batch {bs0} ({meta['mode']} run)",
        )
        plot_names.append(name)
    mismatches = mismatch_details(results)
    text = report.render(
        summaries,
        title=f"Speculative decoding benchmark: {meta['target_name']}",
        description=report.describe_run(meta),
        method_order=method_order,
        dataset_order=dataset_order,
        mismatches=mismatches,
        plots=plot_names,
    )
    (out / "report.md").write_text(text, encoding="utf-8")
    pooled = [s for s in summaries if s.dataset == "all"]
    print(
        report.markdown_table(
            report.COLUMNS, [report.row_cells(r) for r in report.sort_rows(pooled, method_order, dataset_order)]
        )
    )
    print(f"\nreport: {out / 'report.md'}  raw: {out / 'results.json'}")
    failed = [r for r in results if r["status"] == "error"]
    if mismatches:
        print(
            "\nLOSSLESS CHECK FAILED: outputs differ from plain greedy decoding:",
            *mismatches,
            sep="\n  ",
            file=sys.stderr,
        )
    for result in failed:
        print(
            f"\nmethod {result['method']} K={result['k']} failed: {result['reason']} (log: {result.get('log')})",
            file=sys.stderr,
        )
    return 1 if mismatches or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
