"""Benchmark engines in their own process: ``python -m benchmarks.worker JOB.json RESULT.json [JOB RESULT ...]``.

Builds each job's engine (``ouroboros_vllm.tools.offline.make_llm``: fp32, eager, in-process, CPU defaults), warms
it up on a prompt of no dataset, then times greedy generation of every dataset at every batch size, reads
vLLM's spec-decode counters and the drafter's own time around each timed part, writes the results and exits.
With several jobs (``benchmarks.run --paired``: plain and one method) the engines live side by side and take turns
dataset by dataset, the first to go alternating, so that each method meets the machine in the state plain met it
in a minute before or after: this machine's speed moves 10-20% over minutes, and two engines' passes minutes apart
carry that into their ratio. Only one engine runs at a time.
Progress goes to stdout as ``PROGRESS_PREFIX <units>`` lines; everything else printed is log.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.jobs import PROGRESS_PREFIX, DatasetJob, Job
from benchmarks.methods import METHODS, Method

SPEC_COUNTERS = {
    "num_drafts": "vllm:spec_decode_num_drafts",
    "num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}
WARMUP_TOKENS = 8


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths or len(paths) % 2:
        raise SystemExit("usage: python -m benchmarks.worker JOB.json RESULT.json [JOB.json RESULT.json ...]")
    jobs = [Job.read(path) for path in paths[::2]]
    results = run_jobs(jobs)
    for result, result_path in zip(results, paths[1::2], strict=True):
        result_path.write_text(json.dumps(result), encoding="utf-8")
    # vLLM's in-process engine leaves threads behind that can hang a normal interpreter exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _die_with_parent() -> None:
    """Get SIGKILL when the parent dies (Linux), so that no orphaned engine keeps gigabytes of memory."""
    parent = os.getppid()
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def run_jobs(jobs: list[Job]) -> list[dict[str, Any]]:
    """Every job's result: its engine started, then the jobs' (dataset, batch size) parts in turns, the first to go
    rotating from one part to the next. A job whose engine fails to start, or whose run fails, gets an error result
    and the others go on (the parent goes on with the other methods too)."""
    results: list[dict[str, Any]] = []
    engines: list[tuple[int, Any, Method]] = []  # (job index, engine, method) of the jobs that run
    for index, job in enumerate(jobs):
        method = next(m for m in METHODS if m.name == job.method)
        results.append({"method": job.method, "k": job.k, "status": "ok", "reason": None, "runs": []})
        try:
            reason = _unavailable_here(method)
            if reason is not None:
                results[index].update(status="unavailable", reason=reason)
                continue
            llm, results[index]["engine_start_s"] = start_engine(job, method)
            engines.append((index, llm, method))
        except Exception as error:
            _fail(results[index], error)
    parts = [(dataset, batch_size) for dataset in jobs[0].datasets for batch_size in jobs[0].batch_sizes]
    for turn, (dataset, batch_size) in enumerate(parts):
        first = turn % max(len(engines), 1)
        for index, llm, method in engines[first:] + engines[:first]:
            if results[index]["status"] != "ok":
                continue
            try:
                results[index]["runs"].append(_timed_run(llm, method, dataset, batch_size))
            except Exception as error:
                _fail(results[index], error)
    return results


def _fail(result: dict[str, Any], error: Exception) -> None:
    result.update(status="error", reason=f"{type(error).__name__}: {error}")
    traceback.print_exc()


def start_engine(job: Job, method: Method) -> tuple[Any, float]:
    """The job's engine, warmed up, and the seconds it took to start."""
    from ouroboros_vllm.tools.offline import apply_cpu_env_defaults

    apply_cpu_env_defaults()
    from vllm import SamplingParams

    from ouroboros_vllm.tools.offline import make_llm

    start = time.perf_counter()
    kwargs = method.engine_kwargs(job.k or 0, job.draft, job.references)
    if method.speculative:
        kwargs["per_request_spec_decode_metrics"] = "summary"
    llm = make_llm(
        job.target, kv_cache_gib=job.kv_cache_gib, max_model_len=job.max_model_len, disable_log_stats=False, **kwargs
    )
    engine_start_s = time.perf_counter() - start
    # The first generate pays one-time costs (allocations, lazy init); it uses a prompt of no dataset so that
    # no cache or pool is warmed for a measured prompt.
    llm.generate(
        [_tokens_prompt(job.warmup_prompt)], SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS), use_tqdm=False
    )
    return llm, engine_start_s


def _timed_run(llm: Any, method: Method, dataset: DatasetJob, batch_size: int) -> dict[str, Any]:
    """Generate ``dataset`` at ``batch_size`` and measure it; a ``warm`` method first gets one untimed pass."""
    if method.warm:
        _generate(llm, dataset, batch_size)
    # Every timed pass starts with the target's prefix cache empty: an engine that ran these prompts before (at
    # another batch size, or in a warm pass) would read them from its cache, and engines differ in that (the
    # stateful methods get an engine per batch size): plain's batch 8 after batch 1 read its prompts twice as
    # fast as a fresh engine's. What prompts of one pass share stays cached, alike for every method.
    prefix_cache_reset = bool(llm.reset_prefix_cache())
    counters_before = _spec_counters(llm)
    drafter_before = _drafter_stats(llm, method)
    plans_before = _plan_stats(llm, method)
    batches, prompts = _generate(llm, dataset, batch_size)
    counters_after = _spec_counters(llm)
    drafter_after = _drafter_stats(llm, method)
    plans_after = _plan_stats(llm, method)
    wall_s = sum(batch["wall_s"] for batch in batches)
    spec = None
    if counters_before is not None and counters_after is not None:
        spec = {key: counters_after[key] - counters_before[key] for key in SPEC_COUNTERS}
    return {
        "dataset": dataset.name,
        "batch_size": batch_size,
        "max_tokens": dataset.max_tokens,
        "prefix_cache_reset": prefix_cache_reset,
        "wall_s": wall_s,
        "num_output_tokens": sum(len(p["output_token_ids"]) for p in prompts),
        "decode_window_s": _sum_or_none(batch["decode_window_s"] for batch in batches),
        "spec": spec,
        "draft_seconds": None
        if drafter_before is None
        else drafter_after["draft_seconds"] - drafter_before["draft_seconds"],
        # The drafter's own counters over this run (ours: DraftStats, e.g. steps, draft_forwards, suffix tokens).
        "drafter_stats": None if drafter_before is None else _difference(drafter_after, drafter_before),
        # The adaptive planner's choices over this run: rows per proposed length, probe, exploration and declined
        # catch-up counts (None for a method without our planner).
        "plan_stats": None if plans_before is None else _difference(plans_after, plans_before),
        "batches": batches,
        "prompts": prompts,
    }


def _generate(llm: Any, dataset: DatasetJob, batch_size: int) -> tuple[list[dict], list[dict]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=dataset.max_tokens)
    batches: list[dict] = []
    prompts: list[dict] = []
    selected = dataset.prompts_at(batch_size)
    for start in range(0, len(selected), batch_size):
        chunk = selected[start : start + batch_size]
        begin = time.perf_counter()
        outputs = llm.generate([_tokens_prompt(p.token_ids) for p in chunk], params, use_tqdm=False)
        wall_s = time.perf_counter() - begin
        records = [_prompt_record(p.id, output) for p, output in zip(chunk, outputs, strict=True)]
        prompts.extend(records)
        batches.append(
            {
                "prompt_ids": [p.id for p in chunk],
                "wall_s": wall_s,
                "decode_window_s": _decode_window([output.metrics for output in outputs]),
            }
        )
        print(f"{PROGRESS_PREFIX}{len(chunk)}", flush=True)
    return batches, prompts


def _prompt_record(prompt_id: str, output: Any) -> dict[str, Any]:
    completion = output.outputs[0]
    stats = output.metrics
    spec = getattr(completion, "spec_decode_metrics", None)
    if spec is not None and hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    return {
        "id": prompt_id,
        "num_prompt_tokens": len(output.prompt_token_ids),
        "num_cached_tokens": getattr(output, "num_cached_tokens", None),  # read from the target's prefix cache
        "output_token_ids": list(completion.token_ids),
        "finish_reason": completion.finish_reason,
        # Engine-core monotonic timestamps (same clock: the engine runs in this process).
        "ttft_s": _diff(stats, "first_token_ts", "queued_ts"),
        "decode_s": _diff(stats, "last_token_ts", "first_token_ts"),
        "spec": spec,
    }


def _decode_window(stats: list[Any]) -> float | None:
    """From the batch's first first token to its last token: the part of a batch speculation can speed up."""
    firsts = [getattr(s, "first_token_ts", 0.0) for s in stats if s is not None]
    lasts = [getattr(s, "last_token_ts", 0.0) for s in stats if s is not None]
    if not firsts or len(firsts) != len(stats) or min(firsts) <= 0:
        return None
    return max(lasts) - min(firsts)


def _spec_counters(llm: Any) -> dict[str, int] | None:
    """vLLM's spec-decode counters summed over engines, or ``None`` for an engine without speculation."""
    totals: dict[str, int] = {}
    for metric in llm.get_metrics():
        for key, name in SPEC_COUNTERS.items():
            if metric.name == name:
                totals[key] = totals.get(key, 0) + int(metric.value)
    return totals if len(totals) == len(SPEC_COUNTERS) else None


def _drafter_stats(llm: Any, method: Method) -> dict[str, float] | None:
    """The drafter's counters (a ``DraftStats``) as a dict, for the drafters that keep them (ours, the oracle)."""
    if not method.reports_draft_time:
        return None
    import dataclasses

    from ouroboros_vllm.tools.offline import engine_proposer

    stats = getattr(engine_proposer(llm), "stats", None)
    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else None


def _plan_stats(llm: Any, method: Method) -> dict[str, Any] | None:
    """Our adaptive planner's counters (an ``AdaptiveStats``) as a dict; None where the method has no planner."""
    if not method.reports_draft_time:
        return None
    import dataclasses

    from ouroboros_vllm.tools.offline import engine_proposer

    controller = getattr(engine_proposer(llm), "controller", None)
    stats = getattr(controller, "stats", None)
    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else None


def _difference(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` for counters, key by key for dicts of counters (keys that stayed at 0 left out)."""
    difference: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, dict):
            grown = {k: v - before[key].get(k, 0) for k, v in value.items()}
            difference[key] = {k: v for k, v in grown.items() if v}
        else:
            difference[key] = value - before[key]
    return difference


def _unavailable_here(method: Method) -> str | None:
    if method.kind == "suffix":
        try:
            import arctic_inference.suffix_decoding  # noqa: F401  (what vLLM's suffix method imports)
        except ImportError as error:
            from benchmarks.methods import ARCTIC_INSTALL_HINT

            return f"{ARCTIC_INSTALL_HINT} ({error})"
    return None


def _tokens_prompt(token_ids: list[int]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(token_ids))


def _diff(stats: Any, end: str, start: str) -> float | None:
    a, b = getattr(stats, end, 0.0), getattr(stats, start, 0.0)
    return a - b if stats is not None and a > 0 and b > 0 else None


def _sum_or_none(values: Any) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


if __name__ == "__main__":
    main()
