"""What tree verification adds to a target step on vLLM-CPU, by context length and tree rows (no engine).

Per tree row and layer, the overlay attends the query rows off the first depth-first path over the row's paged
K/V; after sampling, the accepted nodes' K/V move into place in every layer. This
times both with the target's attention shapes (default: Qwen2.5-Coder-1.5B: 28 layers, 12 query heads, 2 KV
heads, head dim 128) and vLLM's own C++ attention for the same row as the yardstick, and writes
``overlay.json`` and ``overlay.md``::

    python -m benchmarks.tree_overlay --out docs/benchmarks/tree-overlay
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ouroboros_vllm.vllm_plugin import tree_attention


def _median_ms(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def kernel_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int, scale: float
) -> Callable[[], torch.Tensor]:
    """vLLM-CPU's own causal attention of one request's query rows (the last of its ``length`` positions) over
    its paged cache (``vec`` ISA), ready to call: the scheduler metadata is made once."""
    from vllm import _custom_ops as ops

    num_blocks, kv_heads, block_size, twice_head_dim = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, kv_heads, 2 * block_size, twice_head_dim // 2).chunk(2, dim=2)
    query_start = torch.tensor([0, query.shape[0]], dtype=torch.int32)
    seq_lens = torch.tensor([length], dtype=torch.int32)
    block_table = block_ids.view(1, -1).to(torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=query.shape[1], num_kv_heads=kv_heads, head_dim=twice_head_dim // 2,
        seq_lens=seq_lens, dtype=query.dtype, query_start_loc=query_start, causal=True, sliding_window_size=-1,
        isa="vec", enable_kv_split=False,
    )  # fmt: skip
    out = torch.empty_like(query)

    def run() -> torch.Tensor:
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=query_start,
            seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=block_table, softcap=0.0, scheduler_metadata=metadata, s_aux=None,
        )  # fmt: skip
        return out

    return run


def measure(context: int, rows: int, nodes: int, shape: argparse.Namespace) -> dict[str, float]:
    """Milliseconds per engine step (all layers) for one tree row: the overlay, the compaction, and vLLM's kernel
    on the row's ``nodes + 1`` query tokens."""
    heads, kv_heads, head_dim, block_size = shape.heads, shape.kv_heads, shape.head_dim, shape.block_size
    length = context + nodes + 1
    num_blocks = -(-length // block_size) + 1
    kv_cache = torch.randn(num_blocks, kv_heads, block_size, 2 * head_dim)
    block_ids = torch.randperm(num_blocks)[: -(-length // block_size)].to(torch.int32)
    query = torch.randn(nodes + 1, heads, head_dim)
    parents = [*range(-1, nodes - rows - 1), *([nodes - rows - 1] * rows)]  # a path, then `rows` siblings
    first_row = nodes - rows + 1
    mask = tree_attention.ancestor_mask(parents, context, first_row)
    scale = head_dim**-0.5

    def overlay() -> None:
        for _ in range(shape.layers):
            tree_attention.branch_attention(query[first_row:], kv_cache, block_ids, mask, scale)

    positions = torch.arange(length)
    slots = block_ids[positions // block_size].long() * block_size + positions % block_size
    source, target = slots[context + 1 + first_row - 1 : length], slots[context + 1 : context + 1 + rows]

    def compaction() -> None:
        for _ in range(shape.layers):
            tree_attention.move(kv_cache, source[: len(target)], target)

    run_kernel = kernel_attention(query, kv_cache, block_ids, length, scale)

    def kernel() -> None:
        for _ in range(shape.layers):
            run_kernel()

    return {
        "overlay_ms": _median_ms(overlay, shape.repeats),
        "compaction_ms": _median_ms(compaction, shape.repeats),
        "kernel_ms": _median_ms(kernel, shape.repeats),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4], help="query rows recomputed per tree")
    parser.add_argument("--nodes", type=int, default=8, help="tree nodes (K)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)
    results = []
    for context in args.contexts:
        for rows in args.rows:
            figures = measure(context, rows, args.nodes, args)
            results.append({"context": context, "rows": rows, "nodes": args.nodes, **figures})
            print(json.dumps(results[-1]), flush=True)
    meta = {
        "shape": {k: getattr(args, k) for k in ("layers", "heads", "kv_heads", "head_dim", "block_size")},
        "threads": threads,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlay.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [
        f"Per engine step, one tree row, {args.layers} layers ({args.heads} query / {args.kv_heads} KV heads, head "
        f"dim {args.head_dim}), {args.nodes} nodes, fp32, {threads} threads, load average {meta['load_average']}.",
        "",
        "| context | rows recomputed | overlay ms | compaction ms | vLLM kernel ms (all rows) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['context']} | {r['rows']} | {r['overlay_ms']:.2f} | {r['compaction_ms']:.2f} | {r['kernel_ms']:.2f} |"
        for r in results
    ]
    (args.out / "overlay.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
