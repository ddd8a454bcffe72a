"""The plugin's own time per engine step, apart from the draft model's forwards.

On a GPU the target's step for a 1.5B model takes 4-5 ms with CUDA graphs, so every millisecond the plugin spends
in Python (reading the verification, planning, the pool, bookkeeping, the hooks) comes straight out of the
speedup. This runs a real in-process engine with our proposer and times, per engine step that proposed:

- ``propose`` without the draft runtime's forwards (planning, the pool, the rounds' bookkeeping, metrics);
- the runner hooks' reports: ``on_verified`` (acceptance, feedback into the pool, the cost model) and the
  target's argmax read back in ``split_verification``; ``on_step_start``, ``on_batch``, ``on_requests_*``;
- the draft runtime's own Python (planning each forward's rows, packing them, its cost fits);
- the draft model's compute (its decoder and lm_head calls), for scale: not overhead.

The target drafts for itself by default (the smallest registry model): every proposal is accepted, so every step
does the most bookkeeping. The host's Python speed is what is measured; it is about the same work on a GPU host.

  python -m benchmarks.step_overhead --batch-size 16 --out step_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.environment import describe_machine, summary_line

# What is timed: (owner module, class or None, attribute) -> report name.
_TIMED = {
    ("ouroboros_vllm.vllm_plugin.proposer", "OuroborosProposer", "propose"): "propose",
    ("ouroboros_vllm.vllm_plugin.proposer", "OuroborosProposer", "on_verified"): "on_verified",
    ("ouroboros_vllm.vllm_plugin.proposer", "OuroborosProposer", "on_step_start"): "on_step_start",
    ("ouroboros_vllm.vllm_plugin.proposer", "OuroborosProposer", "on_batch"): "on_batch",
    ("ouroboros_vllm.vllm_plugin.proposer", "OuroborosProposer", "on_requests_added"): "on_requests",
    ("ouroboros_vllm.vllm_plugin.proposer", "OuroborosProposer", "on_requests_finished"): "on_requests",
    ("ouroboros_vllm.vllm_plugin.hooks", None, "split_verification"): "split_verification",
    ("ouroboros_vllm.runtime.draft_runtime", "DraftRuntime", "draft"): "draft_runtime",
}


class Timers:
    """Seconds spent in each timed function, per engine step (a step ends at each ``propose``)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.recording = False
        self.sync: Callable[[], None] = lambda: None  # torch.cuda.synchronize on a GPU: device time is timed
        self.in_graph_run = False

    def time_graph_runs(self, name: str) -> None:
        """Time the static forward's graph launches (capture or replay) as ``name``, synchronised: a replay runs
        the decoder's kernels without calling its module, so its forward hooks never see it."""
        from ouroboros_vllm.runtime.static_forward import StaticForward

        run = self.wrap(name, StaticForward._run, synced=True)

        def marked(*args: Any, **kwargs: Any) -> Any:
            self.in_graph_run = True
            try:
                return run(*args, **kwargs)
            finally:
                self.in_graph_run = False

        StaticForward._run = marked  # type: ignore[method-assign]

    def wrap(self, name: str, function: Callable[..., Any], *, synced: bool = False) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if synced:
                self.sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if synced:
                    self.sync()
                self.current[name] += time.perf_counter() - start
                if name == "propose":
                    self._end_step()

        return timed

    def _end_step(self) -> None:
        if self.recording:
            step = dict(self.current)
            # The draft model's compute is reported apart; the draft runtime's own Python (planning the rounds,
            # packing the forward, its cost fits) is overhead like the rest.
            step["draft_runtime"] = step.get("draft_runtime", 0.0) - step.get("draft_model", 0.0)
            step["propose"] -= step["draft_runtime"] + step.get("draft_model", 0.0)
            self.steps.append(step)
        self.current.clear()

    def time_module(self, name: str, module: Any) -> None:
        """Time a torch module's calls (forward hooks) as ``name``."""
        started: list[float] = []

        def begin(*_: Any) -> None:
            self.sync()
            started.append(time.perf_counter())

        def done(*_: Any) -> None:
            self.sync()
            seconds = time.perf_counter() - started.pop()
            if not self.in_graph_run:  # a graph's capture: its replay wrapper counts it already
                self.current[name] += seconds

        module.register_forward_pre_hook(begin)
        module.register_forward_hook(done)

    def install(self) -> None:
        import importlib

        for (module_name, class_name, attribute), name in _TIMED.items():
            module = importlib.import_module(module_name)
            owner = getattr(module, class_name) if class_name else module
            setattr(owner, attribute, self.wrap(name, getattr(owner, attribute)))

    def report(self) -> dict[str, Any]:
        names = sorted({name for step in self.steps for name in step})
        per_step = {name: [1000 * step.get(name, 0.0) for step in self.steps] for name in names}
        overhead = [
            sum(ms for name, ms in zip(names, values, strict=True) if name != "draft_model")
            for values in zip(*per_step.values(), strict=True)
        ]
        summary = {name: _stats(values) for name, values in per_step.items()}
        return {"steps": len(self.steps), "overhead_ms": _stats(overhead), "per_function_ms": summary}


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--target", default="smollm2-135m-instruct", help="a folder or a registry name")
    parser.add_argument("--draft", default=None, help="a folder or a registry name (default: the target)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--settings", default="{}", help='more of additional_config["ouroboros"], as JSON')
    parser.add_argument("--llm", default="{}", help="more LLM() keyword arguments, as JSON (on a GPU: dtype)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    from ouroboros_vllm.tools import models
    from ouroboros_vllm.tools.offline import apply_cpu_env_defaults, engine_proposer, make_llm

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its steps timed
    apply_cpu_env_defaults()
    machine = describe_machine()
    print(summary_line(machine), flush=True)
    target = str(models.fetch(args.target)) if args.target in models.MODELS else args.target
    draft = args.draft or args.target
    draft = str(models.fetch(draft)) if draft in models.MODELS else draft
    settings = {"draft_model": draft} | json.loads(args.settings)

    timers = Timers()
    timers.install()
    from vllm import SamplingParams

    llm_kwargs = {"max_num_seqs": max(args.batch_size, 1)} | json.loads(args.llm)
    llm = make_llm(target, ouroboros=settings, num_speculative_tokens=args.k, **llm_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    topics = ["def parse_config(path):", "The history of the printing press", "SELECT name, count(*) FROM",
              "Write a haiku about rain.", "import numpy as np\n\nclass Matrix:", "Dear hiring manager,"]  # fmt: skip
    prompts = [f"{topics[i % len(topics)]} #{i}" for i in range(args.batch_size)]
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up: one-time costs stay out of the steps
    drafter = engine_proposer(llm).drafter
    if drafter is not None:  # the draft model's compute: its decoder and lm_head calls, graph replays on a GPU
        import torch

        if torch.cuda.is_available():
            timers.sync = torch.cuda.synchronize
            timers.time_graph_runs("draft_model")
        timers.time_module("draft_model", drafter.model.get_decoder())
        timers.time_module("draft_model", drafter.model.get_output_embeddings())
    timers.current.clear()
    timers.recording = True
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    timers.recording = False
    report = timers.report() | {
        "batch_size": args.batch_size,
        "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "wall_s": wall,
        "settings": settings,
        "k": args.k,
        "machine": machine,
        "load_average_after": os.getloadavg(),
    }
    print(json.dumps({k: report[k] for k in ("steps", "overhead_ms", "per_function_ms")}, indent=1), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
