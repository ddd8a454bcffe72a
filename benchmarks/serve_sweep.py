"""A concurrency sweep through the real OpenAI server: plain decoding against our proposer, same prompts.

For each server (plain, then ours with the default settings, then any of ``SERVERS`` named with ``--servers``)
the sweep starts ``ouroboros-vllm serve`` on
127.0.0.1, sends a fixed mix of HumanEval and MT-Bench prompts at each concurrency (streaming, greedy), measures
output tokens per second and the mean time per output token (TPOT), checks that every output equals plain's,
reads our proposer's counters around each level (its tau there, and how many proposals were trees), and stops the
server by its PID. Results: ``serving.json`` (raw per-request numbers), ``report.md``, and ``serving.png``.

  python -m benchmarks.serve_sweep --out docs/benchmarks/serving      # ~15 min on an idle 2-core CPU
  python -m benchmarks.serve_sweep --servers ouroboros ouroboros-tree --out DIR   # the chain against the tree

Each client sends its next request the moment one ends. Started together, the clients of a plain server stay in
lock step (every request of a wave ends together, then the next wave's prompts are read with nothing decoding),
a pattern a server with independent users does not see and one that speculation, which ends requests at
different times, breaks: ``--stagger SECONDS`` spreads the clients' first requests over that many seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import datasets as ds
from benchmarks.environment import describe_machine, load_average, summary_line
from benchmarks.run import DEFAULT_DRAFT, DEFAULT_TARGET, REPO_ROOT, _tokenizer, render_prompt, resolve_model
from ouroboros_vllm.algorithm.stats import DraftStats
from ouroboros_vllm.tools.server_process import ServerProcess, metric_value, ouroboros_args
from ouroboros_vllm.vllm_plugin.metrics import stats_counter_name

# Our servers by name: the settings each adds to ``additional_config["ouroboros"]`` (besides the draft model).
SERVERS: dict[str, dict[str, Any]] = {
    "ouroboros": {},  # the default settings
    "ouroboros-chain": {"verification": "chain"},
    "ouroboros-tree": {"verification": "tree"},
    "ouroboros-fixed": {"adaptive": False},
}

# Our proposer's counters (DraftStats fields, as /metrics shows them), read before and after each level: what it did
# there.
PROPOSER_COUNTERS = ("rounds", "verified_rounds", "accepted_tokens", "tree_choice_rounds", "tree_rounds")


@dataclass
class RequestResult:
    prompt: int
    output_token_ids: list[int]
    start_s: float
    first_token_s: float | None
    end_s: float

    @property
    def tpot_s(self) -> float | None:
        n = len(self.output_token_ids)
        return (self.end_s - self.first_token_s) / (n - 1) if self.first_token_s is not None and n > 1 else None


def stream_completion(
    url: str, model: str, prompt: list[int], max_tokens: int, index: int, delay_s: float = 0.0
) -> RequestResult:
    """One streamed greedy completion, sent ``delay_s`` seconds from now; the time of its first and last token."""
    time.sleep(delay_s)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "return_token_ids": True}  # fmt: skip
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    start = time.perf_counter()
    first, tokens = None, []
    with urllib.request.urlopen(request, timeout=1800) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[len("data: ") :]).get("choices", []):
                ids = choice.get("token_ids") or []
                if ids and first is None:
                    first = time.perf_counter()
                tokens += ids
    return RequestResult(index, tokens, start, first, time.perf_counter())


def run_level(
    server: ServerProcess, prompts: list[list[int]], concurrency: int, max_tokens: int, stagger_s: float = 0.0
) -> dict[str, Any]:
    """Every prompt at this concurrency (a pool of ``concurrency`` clients, each sending its next request when one
    ends); wall time from first send to last end. ``stagger_s``: the clients' first requests are spread evenly
    over that many seconds instead of starting together, so that the clients do not run in lock step."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(stream_completion, server.url, server.model, p, max_tokens, i,
                               stagger_s * i / concurrency if i < concurrency else 0.0)
                   for i, p in enumerate(prompts)]  # fmt: skip
        results = [f.result() for f in futures]
    wall = time.perf_counter() - start
    tokens = sum(len(r.output_token_ids) for r in results)
    tpots = [r.tpot_s for r in results if r.tpot_s is not None]
    return {
        "concurrency": concurrency,
        "stagger_s": stagger_s,
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_second": tokens / wall,
        "mean_tpot_s": sum(tpots) / len(tpots) if tpots else None,
        "requests": [asdict(r) for r in results],
    }


def proposer_counters(server: ServerProcess) -> dict[str, float] | None:
    """Our proposer's counters as the server shows them now (None: a server without our proposer).

    The proposer learns of finished requests at the engine's next step and pushes its counters then (or every few
    seconds), so a level's last steps show only after one more step: a 1-token request runs that step first."""
    stream_completion(server.url, server.model, [0], 1, -1)
    exposition = server.metrics()
    values = {name: metric_value(exposition, stats_counter_name(name)) for name in PROPOSER_COUNTERS}
    return None if values["rounds"] is None else {name: value or 0.0 for name, value in values.items()}


def difference(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    return None if before is None or after is None else {name: after[name] - before[name] for name in after}


def sweep(name: str, target: str, args: list[str], prompts: list[list[int]], levels: list[int], max_tokens: int,
          out: Path, stagger_s: float = 0.0, repetition: int = 0) -> dict[str, Any]:  # fmt: skip
    log = out / (f"server-{name}.log" if repetition == 0 else f"server-{name}-{repetition}.log")
    server = ServerProcess(target, log, args)
    try:
        stream_completion(server.url, server.model, prompts[0], 8, -1)  # warm-up
        runs, counters = [], proposer_counters(server)
        for level in levels:
            count = max(2 * level, 4)
            batch = [prompts[i % len(prompts)] for i in range(count)]
            print(f"{name}: concurrency {level}, {count} requests ...", flush=True)
            runs.append(run_level(server, batch, level, max_tokens, stagger_s))
            print(f"{name}: concurrency {level}: {runs[-1]['tokens_per_second']:.2f} tok/s", flush=True)
            before, counters = counters, proposer_counters(server)
            runs[-1]["proposer"] = difference(before, counters)
        stats = {m: server.metric(m) for m in ("vllm:ouroboros_mean_acceptance_length",)}
    finally:
        server.stop()
    return {"name": name, "args": args, "runs": runs, "metrics": stats}


def pooled(sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's repeated sweeps as one: per level, every repetition's requests, and the tokens over the summed
    wall time; each repetition's wall time and tokens are kept (``repetitions``)."""
    runs = []
    for level in zip(*(s["runs"] for s in sweeps), strict=True):
        requests = [request for run in level for request in run["requests"]]
        tpots = [t for t in (RequestResult(**r).tpot_s for r in requests) if t is not None]
        wall, tokens = sum(run["wall_s"] for run in level), sum(run["output_tokens"] for run in level)
        each = [{"wall_s": run["wall_s"], "output_tokens": run["output_tokens"]} for run in level]
        counted = [run.get("proposer") for run in level]
        proposer = None if None in counted else {name: sum(c[name] for c in counted) for name in counted[0]}
        runs.append({**level[0], "wall_s": wall, "output_tokens": tokens, "tokens_per_second": tokens / wall,
                     "mean_tpot_s": sum(tpots) / len(tpots) if tpots else None, "requests": requests,
                     "repetitions": each, "proposer": proposer})  # fmt: skip
    return {**sweeps[0], "runs": runs, "metrics": [s["metrics"] for s in sweeps]}


def report(data: dict[str, Any]) -> str:
    plain = {r["concurrency"]: r for r in data["servers"][0]["runs"]}
    header = ("server", "concurrency", "plain tok/s", "ours tok/s", "ratio", "each repetition", "plain TPOT ms",
              "ours TPOT ms", "TPOT ratio", "outputs = plain")  # fmt: skip
    lines = ["# Serving: a concurrency sweep through the OpenAI server", "", *data["description"], "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for server in data["servers"][1:]:
        for run in server["runs"]:
            base = plain[run["concurrency"]]
            same = [a["output_token_ids"] == b["output_token_ids"]
                    for a, b in zip(base["requests"], run["requests"], strict=True)]  # fmt: skip
            tpot = run["mean_tpot_s"] and base["mean_tpot_s"] and base["mean_tpot_s"] / run["mean_tpot_s"]
            pairs = zip(base.get("repetitions", [base]), run.get("repetitions", [run]), strict=True)
            each = ", ".join(f"{(b['wall_s'] / b['output_tokens']) / (r['wall_s'] / r['output_tokens']):.2f}x"
                             for b, r in pairs)  # fmt: skip
            lines.append(
                f"| {server['name']} | {run['concurrency']} | {base['tokens_per_second']:.2f} | "
                f"{run['tokens_per_second']:.2f} | {run['tokens_per_second'] / base['tokens_per_second']:.2f}x | "
                f"{each} | {1000 * (base['mean_tpot_s'] or 0):.0f} | {1000 * (run['mean_tpot_s'] or 0):.0f} | "
                f"{tpot or 0:.2f}x | {sum(same)}/{len(same)} |"
            )
    return "\n".join(lines + proposer_table(data["servers"][1:])) + "\n"


def proposer_table(servers: list[dict[str, Any]]) -> list[str]:
    """What our proposer did at each level (from its counters; empty for a run that did not read them): tau, the
    proposals, how many could be trees (verification "auto" at a batch size where trees pay, or "tree") and how
    many the target verified as trees."""
    rows = [(server["name"], run["concurrency"], run["proposer"]) for server in servers for run in server["runs"]
            if run.get("proposer")]  # fmt: skip
    if not rows:
        return []
    header = ("server", "concurrency", "tau", "proposals", "could be trees", "verified as trees")
    lines = ["", "What our proposer did at each level (its counters, read before and after the level):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for name, level, c in rows:
        tau = DraftStats(**c).tau  # the counters are DraftStats fields: tau as the proposer's own line gives it
        lines.append(f"| {name} | {level} | {tau:.2f} | {c['rounds']:.0f} | {c['tree_choice_rounds']:.0f} | "
                     f"{c['tree_rounds']:.0f} |")  # fmt: skip
    return lines


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for server in data["servers"]:
        levels = [r["concurrency"] for r in server["runs"]]
        left.plot(levels, [r["tokens_per_second"] for r in server["runs"]], marker="o", label=server["name"])
        right.plot(levels, [1000 * (r["mean_tpot_s"] or 0) for r in server["runs"]], marker="o", label=server["name"])
    left.set(xlabel="concurrent requests", ylabel="output tokens/s", xscale="log", title="throughput")
    right.set(xlabel="concurrent requests", ylabel="mean TPOT (ms)", xscale="log", title="time per output token")
    for axis in (left, right):
        axis.set_xticks([r["concurrency"] for r in data["servers"][0]["runs"]], minor=False)
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--prompts", type=int, default=8, help="distinct prompts, half HumanEval, half MT-Bench")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=8)
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="spread the clients' first requests over this many seconds (default 0: all at once)",
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=sorted(SERVERS),
        default=["ouroboros"],
        help="our servers to sweep after plain's, in this order (default: ouroboros, the default settings)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="sweep every server N times, the servers taking turns (plain, ours, plain, ours, ...); each level's "
        "figures pool the repetitions: single runs on a small CPU move a few percent (plain's own time too)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    target, _ = resolve_model(args.target)
    draft, _ = resolve_model(args.draft)
    data_dir = ds.default_data_dir(REPO_ROOT)
    items = ds.select_evenly(ds.DATASETS["humaneval"].load(data_dir), args.prompts // 2)
    items += ds.select_evenly(ds.DATASETS["mt_bench"].load(data_dir), args.prompts - args.prompts // 2)
    prompts = [render_prompt(_tokenizer(target), item) for item in items]
    common = ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * (1 << 30)))]
    ours = {name: ouroboros_args({"draft_model": draft, "stats_log_interval_s": 0, **SERVERS[name]},
                                 args.num_speculative_tokens) for name in args.servers}  # fmt: skip
    started = time.time()
    load_start = load_average()
    sweeps: dict[str, list[dict[str, Any]]] = {name: [] for name in ("plain", *ours)}
    for repetition in range(args.repeat):
        for name, extra in (("plain", []), *ours.items()):
            sweeps[name].append(sweep(name, target, common + extra, prompts, args.concurrency, args.max_tokens,
                                      args.out, args.stagger, repetition))  # fmt: skip
    servers = [pooled(runs) for runs in sweeps.values()]
    data = {
        "description": [
            f"- target `{args.target}`, draft `{args.draft}`, K = {args.num_speculative_tokens}, greedy, streaming, "
            f"{args.max_tokens} new tokens; {len(prompts)} prompts (HumanEval and MT-Bench), 2 x concurrency "
            "requests (at least 4) per level; "
            + (f"every server swept {args.repeat} times, taking turns, each level pooled; " if args.repeat > 1 else "")
            + (
                f"the clients' first requests spread over {args.stagger:g} s"
                if args.stagger
                else "all clients start together"
            ),
            f"- machine: {summary_line(describe_machine())}; load average at start {load_start}, at end "
            f"{load_average()}; took {(time.time() - started) / 60:.1f} min",
        ],
        "servers": servers,
    }
    (args.out / "serving.json").write_text(json.dumps(data, indent=1))
    (args.out / "report.md").write_text(report(data))
    plot(data, args.out / "serving.png")
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
