"""One draft forward, timed at fixed shapes: packed against the static grid (CUDA graphs on a GPU).

Each of ``rows`` requests holds ``context`` tokens in the draft's cache and runs the forward a drafting step runs:
one pending token, then ``phrases`` pool phrases of ``phrase_len`` tokens (``--phrases 0``: one token a row, the
plain draft-model step). The same forward repeats (it writes the same slots), so only the forward is timed: the
host's packing, the model, the lm_head, the argmax read back. Median of ``--repeats`` after ``--warmup``.
Checks come with the figures: each forward's argmax against the first forward's at the same shape, and on CUDA
the graphs' argmax against the same grid run without graphs.

  python -m benchmarks.draft_forward --device cuda --precision bfloat16 --rows 1 2 4 8 16 --out draft_forward.json

The model is a folder (random weights built from a config work: only shapes matter here) or a registry name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.environment import describe_machine, summary_line
from ouroboros_vllm.algorithm.drafting import DraftState, ForwardPlan
from ouroboros_vllm.algorithm.layout import forward_layout
from ouroboros_vllm.runtime.draft_runtime import DraftRuntime
from ouroboros_vllm.runtime.loading import quantize_int8


def drafting_plans(rows: int, context: int, phrases: int, phrase_len: int, vocab: int, seed: int) -> list[ForwardPlan]:
    """Each row's drafting forward after ``context`` cached tokens (random ids: shapes are what is timed)."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(rows):
        phrase_list = [tuple(int(t) for t in rng.integers(vocab, size=phrase_len)) for _ in range(phrases)]
        mask, offsets = forward_layout(1, len(phrase_list), phrase_len)
        pending = [int(rng.integers(vocab))]
        ids = pending + [t for p in phrase_list for t in p]
        plans.append(ForwardPlan(context, pending, phrase_list, [], ids, mask, offsets + context, [0]))
    return plans


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(runtime: DraftRuntime, rows: int, context: int, phrases: int, phrase_len: int, warmup: int,
                 repeats: int) -> tuple[dict[str, Any], list[dict[int, int]]]:  # fmt: skip
    """The forward's timing at this shape, and its argmax (per row: new-token index -> the draft's argmax)."""
    vocab = runtime.info.vocab_size
    states = [DraftState() for _ in range(rows)]
    # Fill each row's cache with ``context`` tokens (one catch-up forward per row, untimed).
    for i, state in enumerate(states):
        tokens = np.random.default_rng(100 + i).integers(vocab, size=context).tolist()
        mask = np.tri(context, dtype=bool)
        runtime.forward([(state, ForwardPlan(0, tokens, [], [], tokens, mask, np.arange(context), [context - 1]))])
        state.ids = tokens
    plans = drafting_plans(rows, context, phrases, phrase_len, vocab, seed=rows)
    batch = list(zip(states, plans, strict=True))
    seconds = []
    for i in range(warmup + repeats):
        _sync(runtime.device)
        start = time.perf_counter()
        argmax = runtime.forward(batch)  # reads the argmax back: the host waits for the device, as drafting does
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "rows": rows,
        "tokens_per_row": 1 + phrases * phrase_len,
        "context": context,
        "ms_median": 1000 * statistics.median(seconds),
        "ms_min": 1000 * min(seconds),
        "repeats": repeats,
    }
    if runtime.static is not None and runtime.static.use_graphs:  # the graphs' argmax against the grid run eagerly
        runtime.static.use_graphs = False
        result["graph_equals_eager"] = runtime.forward(batch) == argmax
        runtime.static.use_graphs = True
    for state in states:
        runtime.release(state)
    return result, argmax


def load_model(path: str, device: torch.device, precision: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from ouroboros_vllm.tools import models

    folder = str(models.fetch(path)) if path in models.MODELS else path
    dtype = torch.float32 if precision == "int8" else getattr(torch, precision)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return quantize_int8(model) if precision == "int8" else model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.draft_forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a folder or a registry name")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="int8 (CPU), float32, bfloat16 (default: int8 on CPU)")
    parser.add_argument("--forwards", nargs="+", choices=["packed", "static"], default=["packed", "static"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--phrases", type=int, nargs="+", default=[0, 4], help="pool phrases a row carries")
    parser.add_argument("--phrase-len", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("int8" if device.type == "cpu" else "bfloat16")
    machine = describe_machine()
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["cuda"] = torch.version.cuda
    print(summary_line(machine), flush=True)
    model = load_model(args.model, device, precision)
    results, first_argmax = [], {}
    with torch.inference_mode():
        for forward in args.forwards:
            runtime = DraftRuntime(model, frozenset(), static_shapes=forward == "static")
            for phrases in args.phrases:
                for rows in args.rows:
                    timing, argmax = time_forward(runtime, rows, args.context, phrases, args.phrase_len, args.warmup,
                                                  args.repeats)  # fmt: skip
                    # The same inputs as the first forward's at this shape: the share of argmax (where both read
                    # one) that agree with it
                    # (1.0 in float32; bfloat16 rounds differently at other shapes, and near-ties flip).
                    reference = first_argmax.setdefault((phrases, rows), argmax)
                    pairs = [(a[i], b[i]) for a, b in zip(argmax, reference, strict=True) for i in a.keys() & b.keys()]
                    agreement = sum(x == y for x, y in pairs) / len(pairs)
                    results.append({"forward": forward, "phrases": phrases} | timing | {"argmax_agreement": agreement})
                    print(json.dumps(results[-1]), flush=True)
    if args.out is not None:
        report = {"args": vars(args) | {"out": str(args.out)}, "precision": precision, "machine": machine}
        args.out.write_text(json.dumps(report | {"results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
