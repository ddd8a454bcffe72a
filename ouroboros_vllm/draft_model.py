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

from ouroboros_vllm.lookahead import LookaheadWindow, Ngram
from ouroboros_vllm.masks import kept_cache_indices, phrase_forward_layout

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BY_DTYPE = {dtype: name for name, dtype in _DTYPES.items()}


class DraftModelError(ValueError):
    """The draft model cannot be used with this target (missing, or another tokenizer)."""


@dataclass
class DraftSequence:
    """One request's draft-side state: the KV cache and the ids whose keys and values it holds."""

    cache: object | None = None  # a transformers Cache, created by the first forward
    ids: list[int] = field(default_factory=list)
    window: LookaheadWindow | None = None  # the lookahead window, carried across the request's rounds

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
    def load(cls, path: str, *, target_tokenizer: str, device: torch.device, precision: str) -> DraftModel:
        """Load the draft from ``path`` after checking that it shares the target's tokenizer.

        ``precision`` is a dtype name, or ``"int8"``: float32 weights quantized once at load (see
        :func:`quantize_int8`).
        """
        from transformers import AutoModelForCausalLM

        source = resolve_model_path(path)
        check_same_tokenizer(source, target_tokenizer)
        dtype = torch.float32 if precision == "int8" else _DTYPES[precision]
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
        if precision == "int8":
            model = quantize_int8(model)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        logger.info("ouroboros-vllm: draft model %s loaded (%s, %s)", source, precision, device)
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
        *,
        window_shape: tuple[int, int] = (0, 0),
        add_ngrams: Callable[[list[Ngram]], None] | None = None,
    ) -> tuple[list[int], int]:
        """The draft model's greedy continuation of ``history`` drafted phrase by phrase; (tokens, forwards).

        Each forward carries the pending tokens, the request's lookahead window of ``window_shape`` (levels,
        width; none when width is 0) and the pool's phrases for the last pending token (see
        :mod:`ouroboros_vllm.masks`); the longest phrase prefix that equals the model's own greedy tokens is
        accepted, so one forward emits 1 to N tokens. The N-grams the window completes go to ``add_ngrams``
        after each forward (so the next forward can already use them). The result is exactly what
        :meth:`greedy` returns.
        """
        pending = seq.rewind_to(history)
        levels, width = window_shape
        if width and seq.window is None:
            seq.window = LookaheadWindow.from_history(history.tolist(), levels, width)
        drafted: list[int] = []
        forwards = 0
        while len(drafted) < num_tokens:
            # The shared pool also holds other requests' text, which may use ids past the draft's embedding
            # table (a target vocabulary padded larger than the draft's): such phrases cannot be fed.
            phrases = [p for p in phrases_for(pending[-1]) if max(p, default=0) < self.vocab_size]
            emitted, ngrams = self._phrase_forward(seq, pending, phrases, bool(width))
            if ngrams and add_ngrams is not None:
                add_ngrams(ngrams)
            forwards += 1
            for token in emitted:
                drafted.append(token)
                if token in self.eos_token_ids:
                    return drafted, forwards
            pending = [emitted[-1]]
        return drafted[:num_tokens], forwards

    def _phrase_forward(
        self, seq: DraftSequence, pending: list[int], phrases: list[tuple[int, ...]], use_window: bool
    ) -> tuple[list[int], list[Ngram]]:
        """One forward: (the tokens it emits, the N-grams its lookahead window completed)."""
        phrase_len = len(phrases[0]) if phrases else 0
        cached = len(seq.ids)
        window = seq.window if use_window else None
        window_tokens = window.tokens() if window is not None else []
        window_outputs = [len(pending) + slot for slot in window.output_slots()] if window is not None else []
        mask, positions = phrase_forward_layout(
            cached, len(pending), len(phrases), phrase_len, self.device,
            window_levels=window.num_levels if window is not None else 0,
            window_width=window.width if window is not None else 0,
        )
        first_phrase = len(pending) + len(window_tokens)
        input_ids = pending + window_tokens + [token for phrase in phrases for token in phrase]
        # Logits only where an argmax is used: the lm_head is a large share of a small model's forward.
        keep = [len(pending) - 1, *window_outputs, *range(first_phrase, len(input_ids))]
        out = self.model(
            input_ids=torch.tensor([input_ids], dtype=torch.long, device=self.device),
            position_ids=positions,
            attention_mask=mask,
            past_key_values=seq.cache,
            use_cache=True,
            logits_to_keep=torch.tensor(keep, device=self.device),
        )
        seq.cache = out.past_key_values
        predicted = out.logits[0].argmax(dim=-1).tolist()
        next_token = predicted[0]
        ngrams: list[Ngram] = []
        if window is not None:
            outputs = predicted[1 : 1 + len(window_outputs)]
            ngrams = window.ngrams(pending[-1], outputs)
            window.advance(next_token, outputs)
        predicted = [next_token, *predicted[1 + len(window_outputs) :]]
        best, matched = None, 0
        for index, phrase in enumerate(phrases):
            own = predicted[1 + index * phrase_len : 1 + (index + 1) * phrase_len]  # greedy after each token
            length = 0
            while length < phrase_len and phrase[length] == (next_token if length == 0 else own[length - 1]):
                length += 1
            if length > matched:  # ties: the first (newest) phrase
                best, matched = index, length
        if phrases or window_tokens:
            seq.keep_slots(kept_cache_indices(cached, len(pending), phrase_len, best, matched, len(window_tokens)))
        seq.ids.extend(pending)
        if best is None:
            return [next_token], ngrams
        accepted = list(phrases[best][:matched])
        seq.ids.extend(accepted)
        return [*accepted, predicted[1 + best * phrase_len + matched - 1]], ngrams

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


def resolve_precision(name: str, target_dtype: torch.dtype, device: torch.device) -> str:
    """The draft's precision for the ``draft_dtype`` setting: ``"auto"`` is int8 on CPU, else the target's dtype.

    Measured on a 2-core AVX-512 CPU (Qwen2.5-Coder 0.5B, one new token after 200 cached, transformers 5.19):
    float32 162 ms, bfloat16 80 ms, int8 31 ms a forward. A small model's forward there is bound by reading its
    weights, so the narrowest weights win. On GPUs, PyTorch's int8 dynamic quantization has no kernels.
    """
    if name == "auto":
        return "int8" if device.type == "cpu" else _BY_DTYPE.get(target_dtype, "float32")
    if name == "int8" and device.type != "cpu":
        raise DraftModelError(
            f'additional_config["ouroboros"]["draft_dtype"] = "int8" runs on CPU only (the draft is on {device}); '
            'use "auto", "bfloat16" or "float16"'
        )
    return name


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Int8 weights (per output channel) for every Linear layer, activations quantized at run time, in place.

    PyTorch's dynamic quantization (fbgemm kernels) is the fastest CPU path we measured: torchao's int8
    configs without ``torch.compile`` ran 5-10x slower on the same CPU, and a per-token int8 layer of our own
    (``torch._int_mm``) cost 25-70% more a forward, 2.2x instead of 2.7x end to end. The price: activations
    are scaled once per forward, so a token's logits depend slightly on the other tokens of its forward and
    phrase-by-phrase drafting is no longer bit-for-bit the one-token greedy loop (measured on Qwen2.5-Coder 0.5B,
    code prompts: 11 of 18 rounds identical). It never changes the output, which the target verifies; the
    exact-drafting property holds for the float dtypes.
    """
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; its CPU kernels are still PyTorch's own.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
