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

from ouroboros_vllm.batched_draft import BatchedCache, batch_inputs, gather_logit_inputs
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


@dataclass
class ForwardPlan:
    """One row's part of a phrase forward (see :mod:`ouroboros_vllm.masks` for the layout)."""

    cached: int  # tokens in the row's cache before the forward (its positions start here)
    pending: list[int]
    phrases: list[tuple[int, ...]]
    window: LookaheadWindow | None
    num_window_tokens: int
    input_ids: list[int]  # q ids: pending + window + phrases
    mask: torch.Tensor  # [q, cached + q], True = attend
    positions: torch.Tensor  # [q]
    logit_rows: list[int]  # the inputs whose argmax is read: last pending, window outputs, every phrase token

    @property
    def compacts(self) -> bool:
        """Whether the forward leaves slots to drop (phrase or window tokens) rather than only pending ones."""
        return bool(self.phrases) or self.num_window_tokens > 0


@dataclass(eq=False)
class DraftRow:
    """One request's drafting job in a step; :meth:`DraftModel.draft_rows` fills ``drafted`` and ``forwards``."""

    seq: DraftSequence
    history: np.ndarray
    num_tokens: int
    phrases_for: Callable[[int], Sequence[tuple[int, ...]]] = lambda key: ()  # none: one token per forward
    window_shape: tuple[int, int] = (0, 0)  # lookahead window (levels, width); width 0: none
    add_ngrams: Callable[[list[Ngram]], None] | None = None
    drafted: list[int] = field(default_factory=list)
    forwards: int = 0
    pending: list[int] = field(default_factory=list)  # tokens to feed at the next forward


# A row with more tokens to feed than this (a new request's prompt) feeds them alone before it joins the batch:
# padded into a shared forward, every other row would pay for its width.
MAX_BATCHED_PENDING = 16


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
            emitted, ngrams = self._phrase_forward(seq, pending, self._feedable(phrases_for, pending[-1]), bool(width))
            if ngrams and add_ngrams is not None:
                add_ngrams(ngrams)
            forwards += 1
            if self._take(drafted, emitted, num_tokens):
                break
            pending = [emitted[-1]]
        return drafted, forwards

    def _feedable(self, phrases_for: Callable[[int], Sequence[tuple[int, ...]]], key: int) -> list[tuple[int, ...]]:
        """The phrases for ``key`` that the draft can be fed. The shared pool also holds other requests' text,
        which may use ids past the draft's embedding table (a target vocabulary padded larger than the draft's)."""
        return [p for p in phrases_for(key) if max(p, default=0) < self.vocab_size]

    def _take(self, drafted: list[int], emitted: list[int], num_tokens: int) -> bool:
        """Append a forward's tokens to ``drafted`` up to an EOS and cut it to ``num_tokens`` (a matched phrase can
        run past the budget); whether drafting is done (EOS, or enough tokens)."""
        for token in emitted:
            drafted.append(token)
            if token in self.eos_token_ids:
                break
        done = drafted[-1] in self.eos_token_ids or len(drafted) >= num_tokens
        del drafted[num_tokens:]
        return done

    @torch.inference_mode()
    def draft_rows(self, rows: Sequence[DraftRow]) -> None:
        """Draft every row as :meth:`phrase_draft` would, the rows sharing one forward per step.

        Rows that cannot share (no cache yet: a one-token prompt) draft alone, as does a lone row.
        """
        batchable = []
        for row in rows:
            pending = row.seq.rewind_to(row.history)
            levels, width = row.window_shape
            if width and row.seq.window is None:
                row.seq.window = LookaheadWindow.from_history(row.history.tolist(), levels, width)
            if len(pending) > MAX_BATCHED_PENDING or (row.seq.cache is None and len(pending) > 1):
                self._forward(row.seq, pending[:-1])  # the prompt's prefill, alone
                pending = pending[-1:]
            row.pending = pending
            if row.seq.cache is not None:
                batchable.append(row)
        if len(batchable) < 2:
            batchable = []
        for row in rows:
            if all(row is not other for other in batchable):
                row.drafted, row.forwards = self.phrase_draft(
                    row.seq, row.history, row.num_tokens, row.phrases_for, window_shape=row.window_shape,
                    add_ngrams=row.add_ngrams)
        if batchable:
            self._draft_batched(batchable)

    def _draft_batched(self, rows: list[DraftRow]) -> None:
        batch = BatchedCache([row.seq for row in rows], self.model.config)
        active = list(rows)  # parallel to the batch's rows
        while active:
            plans = []
            for row in active:
                phrases = self._feedable(row.phrases_for, row.pending[-1])
                plans.append(self.plan_forward(row.seq, row.pending, phrases, bool(row.window_shape[1])))
            input_ids, positions, mask = batch_inputs(plans, batch.slots, batch.length, self.device)
            hidden = self.model.get_decoder()(
                input_ids=input_ids, position_ids=positions, attention_mask=mask, past_key_values=batch.cache,
                use_cache=True,
            ).last_hidden_state
            # Logits only where an argmax is read, every row's at once.
            logit_rows, logit_columns = gather_logit_inputs(plans)
            predicted = self.model.get_output_embeddings()(hidden[logit_rows, logit_columns]).argmax(dim=-1).tolist()
            kept, done, offset = [], set(), 0
            for index, (row, plan) in enumerate(zip(active, plans, strict=True)):
                own = predicted[offset : offset + len(plan.logit_rows)]
                offset += len(plan.logit_rows)
                emitted, ngrams, keep = self.finish_forward(row.seq, plan, own)
                kept.append(keep)
                if ngrams and row.add_ngrams is not None:
                    row.add_ngrams(ngrams)
                row.forwards += 1
                if self._take(row.drafted, emitted, row.num_tokens):
                    done.add(index)
                row.pending = [emitted[-1]]
            batch.add_forward(input_ids.shape[1], kept, plans)
            if done:
                batch.store_and_drop(done)
                active = [row for index, row in enumerate(active) if index not in done]

    def _phrase_forward(
        self, seq: DraftSequence, pending: list[int], phrases: list[tuple[int, ...]], use_window: bool
    ) -> tuple[list[int], list[Ngram]]:
        """One forward: (the tokens it emits, the N-grams its lookahead window completed)."""
        plan = self.plan_forward(seq, pending, phrases, use_window)
        out = self.model(
            input_ids=torch.tensor([plan.input_ids], dtype=torch.long, device=self.device),
            position_ids=plan.positions[None],
            attention_mask=plan.mask[None, None],
            past_key_values=seq.cache,
            use_cache=True,
            # Logits only where an argmax is used: the lm_head is a large share of a small model's forward.
            logits_to_keep=torch.tensor(plan.logit_rows, device=self.device),
        )
        seq.cache = out.past_key_values
        emitted, ngrams, kept = self.finish_forward(seq, plan, out.logits[0].argmax(dim=-1).tolist())
        if plan.compacts:
            seq.keep_slots(kept)
        return emitted, ngrams

    def plan_forward(
        self, seq: DraftSequence, pending: list[int], phrases: list[tuple[int, ...]], use_window: bool
    ) -> ForwardPlan:
        """One row's inputs of a phrase forward: pending tokens, the lookahead window, then the phrases."""
        phrase_len = len(phrases[0]) if phrases else 0
        cached = len(seq.ids)
        window = seq.window if use_window else None
        window_tokens, window_outputs, window_levels, window_width = [], [], 0, 0
        if window is not None:
            window_tokens = window.tokens()
            window_outputs = [len(pending) + slot for slot in window.output_slots()]
            window_levels, window_width = window.num_levels, window.width
        mask, positions = phrase_forward_layout(
            cached, len(pending), len(phrases), phrase_len, self.device,
            window_levels=window_levels, window_width=window_width,
        )
        first_phrase = len(pending) + len(window_tokens)
        input_ids = pending + window_tokens + [token for phrase in phrases for token in phrase]
        return ForwardPlan(
            cached=cached, pending=pending, phrases=phrases, window=window, num_window_tokens=len(window_tokens),
            input_ids=input_ids, mask=mask[0, 0], positions=positions[0],
            logit_rows=[len(pending) - 1, *window_outputs, *range(first_phrase, len(input_ids))],
        )

    def finish_forward(
        self, seq: DraftSequence, plan: ForwardPlan, predicted: list[int]
    ) -> tuple[list[int], list[Ngram], torch.Tensor]:
        """After the forward (``predicted``: the argmax at each of ``plan.logit_rows``): (the tokens it emits,
        the N-grams the window completed, the cache slots of the forward's ``cached + q`` to keep, in order).

        ``seq.ids`` is updated; the cache is not (the caller compacts it to the kept slots).
        """
        phrases, pending, window = plan.phrases, plan.pending, plan.window
        phrase_len = len(phrases[0]) if phrases else 0
        num_window_outputs = len(plan.logit_rows) - 1 - len(phrases) * phrase_len
        next_token = predicted[0]
        ngrams: list[Ngram] = []
        if window is not None:
            outputs = predicted[1 : 1 + num_window_outputs]
            ngrams = window.ngrams(pending[-1], outputs)
            window.advance(next_token, outputs)
        predicted = [next_token, *predicted[1 + num_window_outputs :]]
        best, matched = None, 0
        for index, phrase in enumerate(phrases):
            own = predicted[1 + index * phrase_len : 1 + (index + 1) * phrase_len]  # greedy after each token
            length = 0
            while length < phrase_len and phrase[length] == (next_token if length == 0 else own[length - 1]):
                length += 1
            if length > matched:  # ties: the first (newest) phrase
                best, matched = index, length
        kept = kept_cache_indices(plan.cached, len(pending), phrase_len, best, matched, plan.num_window_tokens)
        seq.ids.extend(pending)
        if best is None:
            return [next_token], ngrams, kept
        accepted = list(phrases[best][:matched])
        seq.ids.extend(accepted)
        return [*accepted, predicted[1 + best * phrase_len + matched - 1]], ngrams, kept

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
