"""Speed under CPU contention: the demo's prompts, plain and ours, with a busy-loop neighbour on the machine.

A server rarely has the machine to itself. This starts one neighbour process that spins on a core, runs the
demo's prompts (greedy, batch size 1) on the plain engine and on ours, stops the neighbour, and reports both
speeds, the speedup under contention, and whether every output matched. With ``--idle`` it also runs both
without the neighbour first, in the same invocation.

  python -m benchmarks.contention --idle --out docs/benchmarks/contention
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.environment import load_average


def _spin() -> None:
    while True:
        pass


def run_pair(target: str, draft: str, settings: dict[str, Any], prompts: list[str], max_tokens: int, k: int,
             engines: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    from ouroboros_vllm.tools.demo import Console, generate_one_by_one
    from ouroboros_vllm.tools.offline import engine_proposer, make_llm

    console = Console(None)
    if "plain" not in engines:
        engines["plain"] = make_llm(target)
        engines["ours"] = make_llm(target, ouroboros={"draft_model": draft, **settings}, num_speculative_tokens=k)
    plain = generate_one_by_one(engines["plain"], "plain", prompts, max_tokens, console)
    ours = generate_one_by_one(engines["ours"], "ouroboros", prompts, max_tokens, console)
    return {
        "plain_tokens_per_second": plain.tokens_per_second,
        "ours_tokens_per_second": ours.tokens_per_second,
        "speedup": ours.tokens_per_second / plain.tokens_per_second,
        "lossless": plain.token_ids == ours.token_ids,
        "proposer": engine_proposer(engines["ours"]).summary(),
    }


def main(argv: list[str] | None = None) -> int:
    from ouroboros_vllm.tools import demo, models
    from ouroboros_vllm.tools.offline import apply_cpu_env_defaults

    parser = argparse.ArgumentParser(prog="python -m benchmarks.contention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--idle", action="store_true", help="also run both without the neighbour, first")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=8)
    parser.add_argument("--set", dest="settings", action="append", default=[], type=demo._setting,
                        metavar="KEY=VALUE", help="an ouroboros setting, as for the demo")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    apply_cpu_env_defaults()
    target, draft = (str(models.fetch(name)) for name in (demo.TARGET, demo.DRAFT))
    settings = dict(args.settings)
    engines: dict[str, Any] = {}
    results: dict[str, Any] = {"settings": settings, "load_average_start": load_average()}
    if args.idle:
        results["idle"] = run_pair(target, draft, settings, demo.PROMPTS, args.max_tokens,
                                   args.num_speculative_tokens, engines)  # fmt: skip
    neighbour = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
    neighbour.start()
    try:
        time.sleep(2)
        results["load_average_with_neighbour"] = load_average()
        results["contended"] = run_pair(target, draft, settings, demo.PROMPTS, args.max_tokens,
                                        args.num_speculative_tokens, engines)  # fmt: skip
    finally:
        neighbour.terminate()
        neighbour.join()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "contention.json").write_text(json.dumps(results, indent=1))
    for name in ("idle", "contended"):
        if name in results:
            r = results[name]
            print(f"{name:>9}: plain {r['plain_tokens_per_second']:.2f} tok/s, ours {r['ours_tokens_per_second']:.2f} "
                  f"tok/s = {r['speedup']:.2f}x, lossless {r['lossless']}; {r['proposer']}")  # fmt: skip
    return 0 if all(results[n]["lossless"] for n in ("idle", "contended") if n in results) else 1


if __name__ == "__main__":
    sys.exit(main())
