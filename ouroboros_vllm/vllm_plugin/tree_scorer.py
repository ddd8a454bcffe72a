"""The scorer adapter: vLLM's CPU runner verifies a draft tree in one target forward.

The proposer returns each request's tree flattened depth-first (vLLM sees a list of draft tokens, at most K)
and hands the hooks its parents. One immutable :class:`TreeStep` per engine step then carries every tree row
through four places, all or nothing per row:

1. ``_prepare_inputs`` (wrapped): a row whose scheduled draft tokens are a prefix of its registered tree becomes
   a tree row; its nodes' positions become ``context + depth`` (RoPE is their only reader; the slots, fixed
   just before from the sequential positions, stay sequential).
2. the CPU attention ``forward`` (wrapped): after vLLM's kernel, the rows after the first depth-first path are
   recomputed under an ancestor mask (:mod:`.tree_attention`).
3. ``rejection_sample`` (wrapped): a tree row's output is the longest path whose every node holds the
   target's argmax at its parent, then the target's token after it (greedy requests only: the proposer makes
   trees for nothing else).
4. ``_sample`` (wrapped, in :mod:`.hooks`): the accepted nodes' K/V move to the slots right after the root,
   which is where the scheduler will look for them.

A row that fails any check is verified as the chain of its tokens, which is always lossless; the listener
learns which rows were trees. Only vLLM's CPU build with the ``vec``/``vec16`` attention ISAs takes trees;
everything here is a pass-through elsewhere.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.logger import init_logger

from ouroboros_vllm.algorithm.tree import DraftTree, walk
from ouroboros_vllm.vllm_plugin import tree_attention

logger = init_logger(__name__)

PLACEHOLDER = -1  # vLLM's PLACEHOLDER_TOKEN_ID: an unused slot of a row's output
_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it samples greedily


@dataclass
class TreeRow:
    row: int  # batch row
    req_id: str
    tree: DraftTree  # as scheduled (a prefix of the proposal)
    start: int  # the root's index among the step's tokens
    context: int  # tokens before the root (its position)
    mask: torch.Tensor  # the recomputed rows' ancestor mask, [rows, context + 1 + nodes]
    first_row: int  # the first recomputed query row (rows before it are the first path's)
    path: list[int] = field(default_factory=list)  # the accepted nodes, once sampled


@dataclass
class TreeStep:
    num_tokens: int  # the step's scheduled tokens (a check that attention sees this step)
    rows: list[TreeRow]

    def req_ids(self) -> set[str]:
        return {row.req_id for row in self.rows}


_active: TreeStep | None = None  # the step under way; set in _prepare_inputs, cleared after _sample


def active() -> TreeStep | None:
    return _active


def deactivate() -> None:
    global _active
    _active = None


def engine_takes_trees(vllm_config: Any) -> bool:
    """Trees need vLLM's CPU build (the only one whose attention :mod:`.tree_attention` overlays), one worker
    (every rank would have to agree on them) and no engine-wide logits processors (they see chain positions);
    otherwise one line, and chains (lossless either way)."""
    from vllm.platforms import current_platform

    parallel = vllm_config.parallel_config
    single = parallel.tensor_parallel_size == 1 and parallel.pipeline_parallel_size == 1
    if current_platform.is_cpu() and single and not getattr(vllm_config.model_config, "logits_processors", None):
        return True
    logger.info("ouroboros-vllm: tree verification needs vLLM's CPU build, tensor and pipeline parallel size 1 "
                "and no custom logits processors; verifying chains")  # fmt: skip
    return False


def takes_tree(params: Any) -> bool:
    """Whether a request's sampling lets its drafts be verified as a tree: greedy, and nothing that reads the
    drafts in chain order (logprobs, structured output, penalties, bad words, pending min_tokens, logit bias:
    their processors see chain positions)."""
    if params is None or getattr(params, "temperature", 1.0) >= _GREEDY_EPS:
        return False
    unset = ("structured_outputs", "guided_decoding", "logit_bias", "allowed_token_ids", "bad_words",
             "thinking_token_budget")  # fmt: skip
    return (
        getattr(params, "logprobs", None) is None  # 0 asks for the sampled token's logprob
        and getattr(params, "prompt_logprobs", None) is None
        and all(not getattr(params, name, None) for name in unset)
        and not getattr(params, "min_tokens", 0)
        and getattr(params, "presence_penalty", 0.0) == 0.0
        and getattr(params, "frequency_penalty", 0.0) == 0.0
        and getattr(params, "repetition_penalty", 1.0) == 1.0
    )


def plan_step(runner: Any, scheduler_output: Any, num_scheduled: Any, trees: dict[str, DraftTree]) -> None:
    """Step 1: choose the tree rows and rewrite their nodes' positions; the plan becomes :func:`active` (the
    caller has ended the previous step's with :func:`deactivate`, and found that the runner :func:`supports_trees`)."""
    global _active
    batch = runner.input_batch
    scheduled_drafts = scheduler_output.scheduled_spec_decode_tokens
    rows = []
    for row, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
        tree, drafts = trees.get(req_id), scheduled_drafts.get(req_id)
        if tree is None or not drafts or req_id not in batch.greedy_reqs:
            continue
        n = len(drafts)
        if int(num_scheduled[row]) != n + 1 or list(drafts) != tree.tokens[:n]:
            continue  # cut differently or not what we proposed: verified as a chain
        tree = tree.truncated(n)
        first_path = tree.first_path_len()
        if first_path == n:
            continue  # a chain: nothing to do
        start = int(runner.query_start_loc.np[row])
        context = int(batch.num_computed_tokens_cpu[row])
        depths = torch.tensor(tree.depths(), dtype=runner.positions.dtype)
        runner.positions[start + 1 : start + 1 + n] = context + depths
        mask = tree_attention.ancestor_mask(tree.parents, context, first_path + 1)
        rows.append(TreeRow(row, req_id, tree, start, context, mask, first_path + 1))
    if rows:
        _active = TreeStep(int(scheduler_output.total_num_scheduled_tokens), rows)


def supports_trees(runner: Any) -> bool:
    """Trees on this runner: vLLM's CPU build, one KV cache group, no M-RoPE, every attention layer plain (no
    window, ALiBi, sinks, softcap, quantized KV) on an ISA whose layout passes :func:`layout_round_trip`.
    Checked once per runner."""
    verdict = getattr(runner, "_ouroboros_supports_trees", None)
    if verdict is None:
        try:
            verdict = _check_runner(runner)
        except (ImportError, AttributeError) as error:  # a vLLM whose internals moved: chains, said once
            verdict = False
            logger.warning("ouroboros-vllm: tree verification is off on this vLLM (%s); verifying chains", error)
        if not verdict:
            logger.info("ouroboros-vllm: this engine cannot verify draft trees; every row is verified as a chain")
        runner._ouroboros_supports_trees = verdict
    return verdict


def _check_runner(runner: Any) -> bool:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    if not current_platform.is_cpu() or runner.uses_mrope or len(runner.input_batch.block_table.block_tables) != 1:
        return False
    layers = list(_attention_layers(runner))
    if not layers:
        return False
    for layer in layers:
        impl = layer.impl
        plain = (
            isinstance(impl, CPUAttentionBackendImpl)
            and impl.alibi_slopes is None
            and impl.sinks is None
            and impl.sliding_window in (None, -1)
            and not impl.logits_soft_cap
            and impl.kv_cache_dtype == "auto"
            and getattr(layer, "isa", None) in tree_attention.SUPPORTED_ISAS
        )
        if not plain:
            return False
    cache = _layer_cache(layers[0])
    return tree_attention.layout_round_trip(layers[0].isa, cache.dtype, cache.shape[-1] // 2, cache.shape[2])


def _attention_layers(runner: Any) -> Any:
    from vllm.model_executor.layers.attention.attention import Attention

    for layer in runner.compilation_config.static_forward_context.values():
        if isinstance(layer, Attention):
            yield layer


def _layer_cache(layer: Any) -> torch.Tensor:
    cache = layer.kv_cache
    return cache[0] if isinstance(cache, (list, tuple)) else cache  # older vLLMs: one per virtual engine


def overlay(impl: Any, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, output: torch.Tensor) -> None:
    """Step 2, in one layer: recompute the tree rows past their first path under the ancestor mask."""
    step = _active
    if step is None or metadata is None or metadata.num_actual_tokens != step.num_tokens or not kv_cache.numel():
        return
    heads, head_dim = query.shape[1], query.shape[2]
    out = output.view(output.shape[0], heads, head_dim)
    block_size = kv_cache.shape[2]
    for tree_row in step.rows:
        length = tree_row.mask.shape[1]
        blocks = metadata.block_table[tree_row.row, : math.ceil(length / block_size)]
        first, last = tree_row.start + tree_row.first_row, tree_row.start + len(tree_row.tree) + 1
        out[first:last] = tree_attention.branch_attention(
            query[first:last], kv_cache, blocks, tree_row.mask, impl.scale
        )


def accept(output_token_ids: torch.Tensor, arguments: inspect.BoundArguments) -> None:
    """Step 3: each tree row's output becomes its longest accepted path and the target's next token."""
    step = _active
    if step is None:
        return
    num_draft = arguments.arguments["num_draft_tokens"]
    ends = arguments.arguments["cu_num_draft_tokens"].tolist()
    target_logits, bonus = arguments.arguments["target_logits"], arguments.arguments["bonus_token_ids"]
    for tree_row in step.rows:
        n = len(tree_row.tree)
        if num_draft[tree_row.row] != n:
            raise RuntimeError(f"tree row {tree_row.row}: {n} nodes planned, {num_draft[tree_row.row]} verified")
        start = ends[tree_row.row] - n
        row_argmax = [*target_logits[start : start + n].argmax(dim=-1).tolist(), int(bonus[tree_row.row])]
        path, next_token = walk(tree_row.tree, row_argmax)
        tree_row.path = path
        output_token_ids[tree_row.row].fill_(PLACEHOLDER)
        output_token_ids[tree_row.row, : len(path)] = torch.tensor([tree_row.tree.tokens[i] for i in path])
        output_token_ids[tree_row.row, len(path)] = next_token


def compact(runner: Any) -> None:
    """Step 4: move each accepted path's K/V to the slots after its root, in every layer; then end the step."""
    step = _active
    deactivate()
    if step is None:
        return
    slot_mapping = runner.input_batch.block_table.block_tables[0].slot_mapping.gpu
    sources, targets = [], []
    for tree_row in step.rows:
        for depth, node in enumerate(tree_row.path, start=1):
            if node + 1 != depth:
                sources.append(int(slot_mapping[tree_row.start + 1 + node]))
                targets.append(int(slot_mapping[tree_row.start + depth]))
    if not sources:
        return
    source_slots, target_slots = torch.tensor(sources), torch.tensor(targets)
    seen: set[int] = set()
    for layer in _attention_layers(runner):
        kv_cache = _layer_cache(layer)
        if kv_cache.data_ptr() not in seen:  # layers may share one cache tensor
            seen.add(kv_cache.data_ptr())
            tree_attention.move(kv_cache, source_slots, target_slots)


def wrap_attention_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """Step 2's hook on ``CPUAttentionBackendImpl.forward`` (installed by :func:`.hooks.install`)."""

    def forward(self: Any, layer: Any, query: Any, key: Any, value: Any, kv_cache: Any, attn_metadata: Any, output: Any,
                *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        result = original(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if _active is not None:
            overlay(self, query, kv_cache, attn_metadata, output)
        return result

    return forward


def wrap_rejection_sample(original: Callable[..., Any]) -> Callable[..., Any]:
    """Step 3's hook on ``rejection_sampler.rejection_sample`` (installed by :func:`.hooks.install`)."""
    signature = inspect.signature(original)

    def rejection_sample(*args: Any, **kwargs: Any) -> torch.Tensor:
        output_token_ids = original(*args, **kwargs)
        if _active is not None:
            accept(output_token_ids, signature.bind(*args, **kwargs))
        return output_token_ids

    return rejection_sample
