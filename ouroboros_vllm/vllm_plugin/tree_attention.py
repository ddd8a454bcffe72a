"""The target side of tree verification on vLLM's CPU paged KV cache: the layout, the overlay, the compaction.

vLLM's CPU attention (``_C.cpu_attention_with_kv_cache``) takes no mask: a request's query rows attend causally
in slot order, which is right for a chain and for the first depth-first path of a tree, wrong for every node
after it (it would see its earlier siblings' subtrees). So the overlay recomputes only those rows, over the
request's paged K/V block by block, with an ancestor mask over the tree part. After
acceptance, the accepted nodes' K/V move to the contiguous slots the scheduler will treat as computed.

The cache layout is vLLM's for the ``vec``/``vec16`` attention ISAs (each layer ``[blocks, kv_heads,
block_size, 2 * head_dim]``; per block and head, K stored transposed as ``[head_dim, block_size]``, then V as
``[block_size, head_dim]``). :func:`layout_round_trip` checks that reading agrees with vLLM's own writer
before any tree runs; the ``amx`` ISA packs K/V differently and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SUPPORTED_ISAS = frozenset({"vec", "vec16"})


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of one layer's cache: keys ``[blocks, heads, head_dim, block_size]``, values ``[blocks, heads,
    block_size, head_dim]``."""
    blocks, heads, block_size, twice_head_dim = kv_cache.shape
    head_dim = twice_head_dim // 2
    flat = kv_cache.view(blocks, heads, block_size * twice_head_dim)
    keys = flat[..., : block_size * head_dim].view(blocks, heads, head_dim, block_size)
    values = flat[..., block_size * head_dim :].view(blocks, heads, block_size, head_dim)
    return keys, values


def gather(kv_cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` positions of a request's K and V, each ``[heads, length, head_dim]``."""
    keys, values = split_cache(kv_cache)
    blocks = block_ids.to(torch.long)
    heads, head_dim, block_size = keys.shape[1], keys.shape[2], keys.shape[3]
    k = keys[blocks].permute(1, 0, 3, 2).reshape(heads, -1, head_dim)[:, :length]
    v = values[blocks].permute(1, 0, 2, 3).reshape(heads, -1, head_dim)[:, :length]
    assert k.shape[1] == length, f"{len(blocks)} blocks of {block_size} cannot hold {length} positions"
    return k, v


def move(kv_cache: torch.Tensor, source_slots: torch.Tensor, target_slots: torch.Tensor) -> None:
    """Copy the K/V at ``source_slots`` to ``target_slots`` (all sources are read before any target is written,
    so the two may overlap)."""
    keys, values = split_cache(kv_cache)
    block_size = keys.shape[3]
    src_block, src_offset = source_slots // block_size, source_slots % block_size
    dst_block, dst_offset = target_slots // block_size, target_slots % block_size
    k = keys[src_block, :, :, src_offset].clone()
    v = values[src_block, :, src_offset, :].clone()
    keys[dst_block, :, :, dst_offset] = k
    values[dst_block, :, dst_offset, :] = v


def ancestor_mask(parents: Sequence[int], context: int, first_row: int) -> torch.Tensor:
    """Which keys query rows ``first_row..n`` of a tree's forward may see: the ``context`` positions before the
    root, the root, and each node's ancestors and itself. Rows: root 0, node i at i + 1; ``[rows, context + 1 + n]``."""
    n = len(parents)
    tree = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    tree[:, 0] = True
    for i, parent in enumerate(parents):
        tree[i + 1] = tree[parent + 1]
        tree[i + 1, i + 1] = True
    rows = tree[first_row:]
    return torch.cat([torch.ones(rows.shape[0], context, dtype=torch.bool), rows], dim=1)


def branch_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of ``query`` ``[rows, q_heads, head_dim]`` over a request's paged K/V (its ``block_ids``, the
    first ``mask.shape[1]`` positions) under ``mask`` ``[rows, length]``: ``[rows, q_heads, head_dim]``.

    Computed block by block where the cache keeps them (K is stored transposed, ready for ``q @ K``): gathering
    the context into one contiguous tensor first, and a boolean-masked SDPA over it, cost 5-15x more (measured
    by ``benchmarks.tree_overlay``)."""
    keys, values = split_cache(kv_cache)
    blocks = block_ids.to(torch.long)
    k = keys.index_select(0, blocks)  # [blocks, kv_heads, head_dim, block_size]
    v = values.index_select(0, blocks)  # [blocks, kv_heads, block_size, head_dim]
    num_blocks, kv_heads, head_dim, block_size = k.shape
    rows, q_heads, _ = query.shape
    group = q_heads // kv_heads  # query heads per KV head (GQA)
    length = mask.shape[1]
    q = query.view(rows, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, kv_heads, group * rows, head_dim)
    scores = torch.matmul(q, k).float() * scale  # [blocks, kv_heads, group * rows, block_size]
    scores = scores.permute(1, 2, 0, 3).reshape(kv_heads, group * rows, num_blocks * block_size)[..., :length]
    scores = scores.masked_fill(~mask.repeat(group, 1), float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    weights = F.pad(weights, (0, num_blocks * block_size - length))
    weights = weights.view(kv_heads, group * rows, num_blocks, block_size).permute(2, 0, 1, 3)
    out = torch.matmul(weights, v).sum(0)  # [kv_heads, group * rows, head_dim]
    return out.view(kv_heads, group, rows, head_dim).permute(2, 0, 1, 3).reshape(rows, q_heads, head_dim)


def layout_round_trip(isa: str, dtype: torch.dtype, head_dim: int, block_size: int) -> bool:
    """Write random K/V with vLLM's own CPU cache writer and read them back with :func:`gather` and after a
    :func:`move`: True when both agree bit for bit (the layout this module assumes is vLLM's)."""
    from vllm import _custom_ops as ops

    if isa not in SUPPORTED_ISAS:
        return False
    generator = torch.Generator().manual_seed(0)
    blocks, heads, length = 4, 2, block_size + 3
    kv_cache = torch.zeros(blocks, heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = kv_cache.view(blocks, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    block_ids = torch.tensor([2, 0], dtype=torch.int32)
    positions = torch.arange(length)
    slots = block_ids[positions // block_size].long() * block_size + positions % block_size
    k = torch.randn(length, heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(length, heads, head_dim, generator=generator).to(dtype)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0)
    gathered_k, gathered_v = gather(kv_cache, block_ids, length)
    if not (torch.equal(gathered_k.transpose(0, 1), k) and torch.equal(gathered_v.transpose(0, 1), v)):
        return False
    move(kv_cache, slots[-2:], slots[:2])
    moved_k, moved_v = gather(kv_cache, block_ids, length)
    return torch.equal(moved_k.transpose(0, 1)[:2], k[-2:]) and torch.equal(moved_v.transpose(0, 1)[:2], v[-2:])
