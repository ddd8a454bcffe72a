"""The draft model: a Hugging Face causal LM run with transformers beside the vLLM target.

One :class:`DraftSequence` per request holds the draft's KV cache and the token ids it covers. Before each
round the sequence is synced to the request's token history: the cache is cut back to the longest prefix it
shares with the history (everything after it was a rejected draft) and only the new tokens are fed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ouroboros_vllm.masks import kept_cache_indices, phrase_forward_layout

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DraftModelError(ValueError):
    """The draft model cannot be used with this target (missing, or another tokenizer)."""


@dataclass
class DraftSequence:
    """One request's draft-side state: the KV cache and the ids whose keys and values it holds."""

    cache: object | None = None  # a transformers Cache, created by the first forward
    ids: list[int] = field(default_factory=list)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached positions (drop a rejected draft's keys and values)."""
        if length >= len(self.ids):
            return
        self.ids = self.ids[:length]
        if self.cache is not None:
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.keys = layer.keys[..., :length, :]
                    layer.values = layer.values[..., :length, :]

    def rewind_to(self, history: np.ndarray) -> list[int]:
        """Cut the cache back to what it shares with ``history``; return the tokens still to feed.

        At least the last token is always fed again: its logits are the ones that predict the next token.
        """
        keep = min(common_prefix_length(self.ids, history), len(history) - 1)
        self.truncate(keep)
        return history[keep:].tolist()

    def keep_slots(self, indices: torch.Tensor) -> None:
        """Keep only these cache slots, in this order (a matched phrase's keys and values move into place)."""
        if self.cache is None:
            return
        for layer in self.cache.layers:
            if layer.is_initialized:
                slots = indices.to(layer.keys.device)
                layer.keys = layer.keys.index_select(-2, slots)
                layer.values = layer.values.index_select(-2, slots)


class DraftModel:
    """A transformers causal LM used greedily as the drafter."""

    def __init__(self, model: torch.nn.Module, eos_token_ids: set[int]) -> None:
        self.model = model
        self.vocab_size = int(model.config.vocab_size)
        self.eos_token_ids = eos_token_ids
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, path: str, *, target_tokenizer: str, device: torch.device, dtype: torch.dtype) -> DraftModel:
        """Load the draft from ``path`` after checking that it shares the target's tokenizer."""
        from transformers import AutoModelForCausalLM

        source = resolve_model_path(path)
        check_same_tokenizer(source, target_tokenizer)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        logger.info("ouroboros-vllm: draft model %s loaded (%s, %s)", source, dtype, device)
        return cls(model, eos_ids)

    def fits(self, history: np.ndarray) -> bool:
        """Whether every id of ``history`` is inside the draft's vocabulary (else its embedding would fail)."""
        return bool(history.size == 0 or int(history.max()) < self.vocab_size)

    @torch.inference_mode()
    def greedy(self, seq: DraftSequence, history: np.ndarray, num_tokens: int) -> list[int]:
        """The draft model's own greedy continuation of ``history``, ``num_tokens`` long (shorter at EOS)."""
        logits = self._forward(seq, seq.rewind_to(history))
        drafted: list[int] = []
        while True:
            token = int(logits.argmax())
            drafted.append(token)
            if len(drafted) == num_tokens or token in self.eos_token_ids:
                return drafted
            logits = self._forward(seq, [token])

    @torch.inference_mode()
    def phrase_draft(
        self,
        seq: DraftSequence,
        history: np.ndarray,
        num_tokens: int,
        phrases_for: Callable[[int], Sequence[tuple[int, ...]]],
    ) -> tuple[list[int], int]:
        """The draft model's greedy continuation of ``history`` drafted phrase by phrase; (tokens, forwards).

        Each forward carries the pending tokens and the pool's phrases for the last of them (see
        :mod:`ouroboros_vllm.masks`); the longest phrase prefix that equals the model's own greedy tokens is
        accepted, so one forward emits 1 to N tokens. The result is exactly what :meth:`greedy` returns.
        """
        pending = seq.rewind_to(history)
        drafted: list[int] = []
        forwards = 0
        while len(drafted) < num_tokens:
            emitted = self._phrase_forward(seq, pending, list(phrases_for(pending[-1])))
            forwards += 1
            for token in emitted:
                drafted.append(token)
                if token in self.eos_token_ids:
                    return drafted, forwards
            pending = [emitted[-1]]
        return drafted[:num_tokens], forwards

    def _phrase_forward(self, seq: DraftSequence, pending: list[int], phrases: list[tuple[int, ...]]) -> list[int]:
        phrase_len = len(phrases[0]) if phrases else 0
        cached = len(seq.ids)
        mask, positions = phrase_forward_layout(cached, len(pending), len(phrases), phrase_len, self.device)
        input_ids = pending + [token for phrase in phrases for token in phrase]
        out = self.model(
            input_ids=torch.tensor([input_ids], dtype=torch.long, device=self.device),
            position_ids=positions,
            attention_mask=mask,
            past_key_values=seq.cache,
            use_cache=True,
            logits_to_keep=len(input_ids) - len(pending) + 1,  # the last pending token and every phrase token
        )
        seq.cache = out.past_key_values
        predicted = out.logits[0].argmax(dim=-1).tolist()
        next_token = predicted[0]
        best, matched = None, 0
        for index, phrase in enumerate(phrases):
            own = predicted[1 + index * phrase_len : 1 + (index + 1) * phrase_len]  # greedy after each token
            length = 0
            while length < phrase_len and phrase[length] == (next_token if length == 0 else own[length - 1]):
                length += 1
            if length > matched:  # ties: the first (newest) phrase
                best, matched = index, length
        if phrases:
            seq.keep_slots(kept_cache_indices(cached, len(pending), phrase_len, best, matched))
        seq.ids.extend(pending)
        if best is None:
            return [next_token]
        accepted = list(phrases[best][:matched])
        seq.ids.extend(accepted)
        return [*accepted, predicted[1 + best * phrase_len + matched - 1]]

    def _forward(self, seq: DraftSequence, new_ids: list[int]) -> torch.Tensor:
        start = len(seq.ids)
        input_ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(new_ids), device=self.device)[None]
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            past_key_values=seq.cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits: the lm_head is a large share of a small model
        )
        seq.cache = out.past_key_values
        seq.ids.extend(new_ids)
        return out.logits[0, -1]


def common_prefix_length(cached: list[int], history: np.ndarray) -> int:
    """Length of the longest common prefix of ``cached`` and ``history``."""
    n = min(len(cached), len(history))
    if n == 0:
        return 0
    mismatch = np.flatnonzero(np.asarray(cached[:n]) != history[:n])
    return int(mismatch[0]) if mismatch.size else n


def resolve_model_path(path: str) -> str:
    """A local folder, or a Hugging Face Hub id; a path that looks local must exist."""
    expanded = Path(os.path.expanduser(path))
    if expanded.is_dir():
        return str(expanded.resolve())
    looks_local = path.startswith(("/", ".", "~")) or expanded.exists() or path.count("/") != 1
    if looks_local:
        raise DraftModelError(
            f'additional_config["ouroboros"]["draft_model"]: no model folder at {str(expanded.absolute())!r} '
            "(give the folder of a Hugging Face causal LM, e.g. from `ouroboros-vllm models path NAME`)"
        )
    return path


def check_same_tokenizer(draft_path: str, target_tokenizer: str) -> None:
    """Refuse a draft whose tokenizer maps any token to another id than the target's tokenizer does."""
    draft_vocab = tokenizer_vocab(draft_path)
    target_vocab = tokenizer_vocab(target_tokenizer)
    if draft_vocab == target_vocab:
        return
    # Tokens the two map differently (or only one of them knows), in the target's id order.
    differing = sorted(
        set(draft_vocab) ^ set(target_vocab) | {t for t in target_vocab if draft_vocab.get(t, -1) != target_vocab[t]},
        key=lambda token: (target_vocab.get(token, len(target_vocab)), token),
    )
    examples = ", ".join(
        f"{token!r} is {draft_vocab.get(token)} in the draft and {target_vocab.get(token)} in the target"
        for token in differing[:3]
    )
    raise DraftModelError(
        f"draft model {draft_path!r} has another tokenizer than the target {target_tokenizer!r}: "
        f"{len(draft_vocab)} and {len(target_vocab)} tokens, {len(differing)} of them mapped differently "
        f"(e.g. {examples}); Ouroboros needs a draft that shares the target's tokenizer"
    )


def tokenizer_vocab(path: str) -> dict[str, int]:
    """The (token, id) map of the tokenizer at ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def resolve_dtype(name: str, target_dtype: torch.dtype) -> torch.dtype:
    return target_dtype if name == "auto" else _DTYPES[name]
