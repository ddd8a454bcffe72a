"""A ``custom_class`` proposer for the tree tests: junk on the first branch, the target's own continuation on the
second. vLLM imports it by name (``tree_oracle.OracleTreeProposer``); the test hands it the expected sequences
and, to check the KV cache, the model runner."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ouroboros_vllm.algorithm.tree import ROOT, DraftTree
from ouroboros_vllm.vllm_plugin import tree_attention
from ouroboros_vllm.vllm_plugin.proposer import OuroborosProposer


class OracleTreeProposer(OuroborosProposer):
    """Each step, for each request it knows the greedy output of: a tree of two branches of ``depth`` tokens
    each under the root, the first junk (each token off by one), the second the true continuation."""

    def __init__(self, vllm_config: Any) -> None:
        super().__init__(vllm_config)
        self.expected: list[list[int]] = []  # prompt + greedy output of every request the test sends
        self.runner: Any = None  # set by the test: the KV cache is read from it
        self.snapshot_at = 0  # once a request's history is this long, keep its KV positions [0, length - 1)
        self.depth = self.num_speculative_tokens // 2
        self.emitted_per_step: list[int] = []  # len(sampled) of every row that had a full tree verified
        self.snapshots: dict[str, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._proposed: set[str] = set()

    def propose(
        self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:  # fmt: skip
        req_ids = self._take_batch_req_ids(len(sampled_token_ids))
        proposals = []
        for row, (req_id, sampled) in enumerate(zip(req_ids, sampled_token_ids, strict=True)):
            if req_id in self._proposed and sampled:
                self.emitted_per_step.append(len(sampled))
            self._proposed.discard(req_id)
            n = int(num_tokens_no_spec[row])
            history = token_ids_cpu[row, :n].tolist()
            if self.snapshot_at and n >= self.snapshot_at and req_id not in self.snapshots and self.runner is not None:
                self.snapshots[req_id] = (history, self._kv(row, n - 1))
            truth = next((seq[n : n + self.depth] for seq in self.expected if seq[:n] == history), [])
            if not sampled or len(truth) < self.depth:
                proposals.append([])
                continue
            junk = [token + 1 for token in truth]
            parents = [*range(ROOT, self.depth - 1), ROOT, *range(self.depth, 2 * self.depth - 1)]
            tree = DraftTree(junk + truth, parents)
            tree.check()
            self._trees[req_id] = tree
            self._proposed.add(req_id)
            proposals.append(tree.tokens)
        return proposals

    def _kv(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's K and V of the row's first ``length`` positions, ``[length, kv_heads, head_dim]`` each."""
        from ouroboros_vllm.vllm_plugin.tree_scorer import _attention_layers, _layer_cache

        block_table = self.runner.input_batch.block_table.block_tables[0].block_table.np[row]
        kv = []
        for layer in _attention_layers(self.runner):
            cache = _layer_cache(layer)
            blocks = torch.from_numpy(np.array(block_table[: -(-length // cache.shape[2])]))
            keys, values = tree_attention.gather(cache, blocks, length)
            kv.append((keys.transpose(0, 1).clone(), values.transpose(0, 1).clone()))
        return kv
