"""The draft runtime: the draft model's one forward, over the persistent cache, for any set of requests.

Why a draft model of our own beside vLLM's target: vLLM runs one model per engine step and verifies one
chain per request; Ouroboros's draft forwards carry custom-mask layouts (pending tokens, the lookahead window,
several pool phrases that must not see each other) and keep only some of their tokens, which vLLM's kernels
cannot do. So the draft runs in transformers with an attention function and a KV cache of ours.

:meth:`DraftRuntime.draft` takes the step's :class:`~ouroboros_vllm.algorithm.drafting.DraftRound` s and runs
forwards until each is done, every unfinished round in every forward (a lone round is a batch of one). Each
forward: the rounds plan their new tokens, the runtime packs them into one sequence, runs the model once,
reads the argmax only where a round asked for it (the lm_head is a large share of a small model's forward:
when many phrases ride along, first at each round's last pending token, then only at the phrases that start
with the argmax found there),
hands each round its argmax and moves the tokens each round keeps into place in its cache row.

With ``static_shapes`` (the default on CUDA), the rows of draft width run on the bucketed grid of
:mod:`.static_forward` instead, which a GPU replays as a CUDA graph; a prompt's catch-up keeps the packed forward.

The cache (:mod:`.kv_cache`) is never gathered or copied per step; a row's attention reads a view of it. A
prompt's catch-up starts from the longest prefix of it that a row already holds (:mod:`.prefix_sharing`).
Each row's numbers are those of the row alone, except that int8 weights scale activations per forward (see
:func:`~ouroboros_vllm.runtime.loading.quantize_int8`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ouroboros_vllm.algorithm.acceptance import Rate
from ouroboros_vllm.algorithm.cost_model import OnlineLinearFit
from ouroboros_vllm.algorithm.drafting import RUNNER_UP_ROW, DraftRound, DraftState, ForwardArgmax, ForwardPlan
from ouroboros_vllm.algorithm.request import DraftModelInfo
from ouroboros_vllm.runtime import attention
from ouroboros_vllm.runtime.argmax import argmax_last, runner_up
from ouroboros_vllm.runtime.attention import PackedBatch, RowSpec, SlotCopy
from ouroboros_vllm.runtime.kv_cache import DraftKVCache
from ouroboros_vllm.runtime.loading import DraftModelError, load_draft_model
from ouroboros_vllm.runtime.prefix_sharing import PrefixIndex
from ouroboros_vllm.runtime.static_forward import MAX_STATIC_WIDTH, StaticForward

# The batch sizes :meth:`DraftRuntime.calibrate` times at engine start: a forward's cost spans 1 to 8 rows' tokens
# and a catch-up of 8 prompts (a server's first wave), in 16 forwards at depth 4 (what the planner trusts).
CALIBRATION_BATCH_SIZES = (1, 2, 4, 8)


class DraftRuntime:
    """A transformers causal LM used greedily as the drafter, with one persistent KV cache for every request."""

    def __init__(
        self,
        model: torch.nn.Module,
        eos_token_ids: frozenset[int],
        static_shapes: bool = False,
        share_prefixes: bool = True,
    ) -> None:
        config = model.config
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise DraftModelError(
                f"draft models with {sorted(layer_types)} layers are not supported (full "
                "attention only: sliding-window layers would need their own cache)"
            )
        attention.register()
        model.config._attn_implementation = attention.ATTENTION_NAME
        self.model = model
        self.device = next(model.parameters()).device
        self.info = DraftModelInfo(vocab_size=int(config.vocab_size), eos_token_ids=eos_token_ids)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
        self.cache = DraftKVCache(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype, self.device)
        self.rows = PrefixIndex(self.cache)
        self.share_prefixes = share_prefixes
        self._query_group = config.num_attention_heads // config.num_key_value_heads
        # Refitted every 16 samples: they steer coarse choices, and a refit in every forward was a measurable
        # share of the runtime's own time at batch 16 (benchmarks/step_overhead.py).
        self._lm_head_cost = OnlineLinearFit(window=64, refit_every=16)
        self._forward_cost = OnlineLinearFit(window=64, refit_every=16)
        self._phrase_width = Rate()  # phrase tokens a row adds to a wide forward (decayed mean)
        self._tail_width = Rate()  # the same for a forward that carries phrase tails only
        self.static = StaticForward(model, self.cache, self._query_group) if static_shapes else None

    @classmethod
    def load(
        cls, path: str, *, target_tokenizer: str, device: torch.device, precision: str, static_shapes: bool = False
    ) -> DraftRuntime:
        loaded = load_draft_model(path, target_tokenizer=target_tokenizer, device=device, precision=precision)
        return cls(loaded.model, loaded.eos_token_ids, static_shapes)

    def release(self, state: DraftState) -> None:
        """The request is done: its cache row goes back to the pool of rows (still holding its tokens, which the
        next owner's prompt may begin with)."""
        self.rows.release(state)
        state.ids.clear()

    def shareable(self, history: np.ndarray) -> int:
        """Tokens at the start of ``history`` that a row of the cache holds: a catch-up to ``history`` copies
        them instead of reading them (none when prefixes are not shared)."""
        return self.rows.shareable(history) if self.share_prefixes else 0

    def catch_ups(self, histories: Sequence[np.ndarray], cached: Sequence[int]) -> list[float]:
        """Tokens each row's catch-up to its history reads, its cache row holding the first ``cached`` (see
        :meth:`.PrefixIndex.catch_ups`: prefixes that rows hold or share are not read again by each)."""
        if not self.share_prefixes:
            return [float(len(h) - c) for h, c in zip(histories, cached, strict=True)]
        return self.rows.catch_ups(histories, cached)

    @torch.inference_mode()
    def draft(
        self, rounds: Sequence[DraftRound], wide: bool | None = None, reproducible: bool = False
    ) -> list[tuple[int, int, float]]:
        """Run forwards until every round is done; every unfinished round shares each forward. Returns each
        forward's (rows, tokens carried, seconds), the rounds' planning and bookkeeping included. ``wide``: whether
        forwards carry the pool's phrases and their tails (None: each decided from this runtime's timings).
        ``reproducible``: no choice from timings at all (wide unless told otherwise, one lm_head call a forward),
        so that the numbers depend on the rounds alone: with int8 weights the activations are scaled per call,
        and a timing-made choice would let the machine's load and other requests' traffic change a draft (nor
        does such a round start from another row's prefix, :mod:`.prefix_sharing`)."""
        timings = []
        active = [r for r in rounds if not r.done]
        share = self.share_prefixes and not reproducible
        copies = self.rows.share(active) if share else []
        if reproducible and wide is None:
            wide = True
        while active:
            start = time.perf_counter()
            carry_phrases = self._may_carry(len(active), self._phrase_width) if wide is None else wide
            carry_tails = self._may_carry(len(active), self._tail_width) if wide is None else wide
            plans = [r.plan(carry_phrases, carry_tails) for r in active]
            predicted = self.forward(
                [(r.state, plan) for r, plan in zip(active, plans, strict=True)], reproducible, copies
            )
            copies = []  # made by the first forward
            for r, plan, argmax in zip(active, plans, predicted, strict=True):
                kept = r.finish(plan, argmax)
                assert r.state.cache_row is not None
                self.cache.compact(r.state.cache_row, plan.cached, kept)
            tokens = sum(plan.num_new for plan in plans)
            timings.append((len(plans), tokens, time.perf_counter() - start))
            self._forward_cost.add(tokens, timings[-1][2])
            if carry_tails or carry_phrases:
                phrase_tokens = sum(len(plan.phrase_rows()) for plan in plans) / len(plans)
                (self._phrase_width if carry_phrases else self._tail_width).add(phrase_tokens, 1, 0.9)
            active = [r for r in active if not r.done]
        return timings

    def calibrate(
        self, batch_sizes: Sequence[int] = CALIBRATION_BATCH_SIZES, prompt_tokens: int = 32, depth: int = 4
    ) -> list[tuple[int, int, float]]:
        """Time the forwards of made-up requests, as the first real ones would run them: at each batch size, one
        forward that reads every row's prompt of ``prompt_tokens`` random ids, then one token a row a forward up to
        ``depth`` tokens. Returns each forward's (rows, tokens carried, seconds), as :meth:`draft` does. A round at
        one row runs first and is not returned: a forward's first calls pay one-time costs (allocations, kernels'
        first runs). The made-up rows go back to the pool of rows (a real prompt never starts with their ids)."""
        generator = np.random.default_rng(0)
        timings = []
        for i, rows in enumerate([1, *batch_sizes]):
            prompts = [generator.integers(0, self.info.vocab_size, prompt_tokens) for _ in range(rows)]
            rounds = [DraftRound(DraftState(), p, depth, frozenset(), self.info.vocab_size) for p in prompts]
            measured = self.draft(rounds, wide=False)
            for round_ in rounds:
                self.release(round_.state)
            timings += measured if i else []
        return timings

    def _may_carry(self, rows: int, width: Rate) -> bool:
        """Whether this forward may carry the pool's phrases (``width``: their tokens per row so far), or their
        context-checked tails. Most phrases are rejected at their first token, and a forward shared by several
        rows only ends sooner if all of them do: so they ride along in a lone row's forward (whose request
        decides for itself in the adaptive mode, :mod:`~ouroboros_vllm.algorithm.phrase_choice`: on a small CPU
        they are not free there either), or while they add at most a quarter to the forward's measured cost."""
        fit = self._forward_cost.fit
        if rows == 1 or fit is None or width.examined == 0:
            return True
        added = rows * width.rate(0.0, prior_trials=0.0)
        return fit.slope * added <= fit.intercept / 4

    @torch.inference_mode()
    def forward(
        self,
        rows: Sequence[tuple[DraftState, ForwardPlan]],
        one_lm_head_call: bool = False,
        copies: Sequence[SlotCopy] = (),
    ) -> list[ForwardArgmax]:
        """One forward of the draft model for these rows' plans; per row, its new tokens' argmax (index among the
        row's new tokens -> the draft's argmax after it) where the plan reads it. ``one_lm_head_call``: at every
        row a plan may read, rather than as this runtime's timings say (see :meth:`draft`). ``copies``: shared
        prefixes copied between these rows inside the forward."""
        for state, _ in rows:
            self.rows.acquire(state)
        if self.static is None:
            return self._packed_forward(rows, one_lm_head_call, copies)
        # The static grid reads the argmax at every row a plan may read (one lm_head call, as one_lm_head_call).
        # Rows that copy a prefix, and their sources, run packed: the copies happen inside its attention.
        found: list[ForwardArgmax] = [ForwardArgmax({}) for _ in rows]
        copying = {row for copy in copies for row in (copy.source, copy.destination)}
        packed = [plan.num_new > MAX_STATIC_WIDTH or state.cache_row in copying for state, plan in rows]
        narrow = [i for i, alone in enumerate(packed) if not alone]
        wide = [i for i, alone in enumerate(packed) if alone]
        if narrow:
            grid = self.static.forward([(rows[i][0].cache_row, rows[i][1]) for i in narrow])  # type: ignore[misc]
            for i, argmax in zip(narrow, grid, strict=True):
                found[i] = argmax
        if wide:
            for i, argmax in zip(
                wide, self._packed_forward([rows[i] for i in wide], one_lm_head_call, copies), strict=True
            ):
                found[i] = argmax
        return found

    def _packed_forward(
        self, rows: Sequence[tuple[DraftState, ForwardPlan]], one_lm_head_call: bool, copies: Sequence[SlotCopy] = ()
    ) -> list[ForwardArgmax]:
        # In cache-row order, the rows' queries are often already laid out as attention wants them (no padding).
        order = sorted(range(len(rows)), key=lambda i: rows[i][0].cache_row)  # type: ignore[arg-type,return-value]
        if order != list(range(len(rows))):
            found = self._packed_forward([rows[i] for i in order], one_lm_head_call, copies)
            return [found[order.index(i)] for i in range(len(rows))]
        self.cache.reserve(max(plan.cached + plan.num_new for _, plan in rows))
        device = self.device
        input_ids = torch.tensor([[t for _, plan in rows for t in plan.input_ids]], dtype=torch.long, device=device)
        positions = torch.from_numpy(np.concatenate([plan.positions for _, plan in rows]))[None].to(device)
        specs = [RowSpec(state.cache_row, plan.cached, plan.mask) for state, plan in rows]  # type: ignore[arg-type]
        batch = PackedBatch(self.cache, specs, self._query_group, copies)
        hidden = self.model.get_decoder()(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=False,
            packed_batch=batch,
        ).last_hidden_state[0]
        starts = [int(start) for start in np.cumsum([0] + [plan.num_new for _, plan in rows])[:-1]]
        plans = [plan for _, plan in rows]
        if one_lm_head_call or not self._two_lm_head_calls(sum(len(plan.phrase_rows()) for plan in plans)):
            wanted = [plan.logit_rows + plan.phrase_rows() for plan in plans]
            found, seconds, probs = self._argmax(
                hidden, [[s + i for i in rows] for s, rows in zip(starts, wanted, strict=True)], runner_ups=True
            )
            return [
                ForwardArgmax({**dict(zip(rows, values, strict=True)), RUNNER_UP_ROW: second}, head)
                for rows, values, second, head in zip(wanted, found, seconds, probs, strict=True)
            ]
        # The argmax where a plan always reads it, then only at the phrase tokens that can matter given the first.
        argmax, seconds, probs = self._argmax(
            hidden, [[s + i for i in p.logit_rows] for s, p in zip(starts, plans, strict=True)], runner_ups=True
        )
        phrase_rows = [plan.phrase_rows(found[0]) for found, plan in zip(argmax, plans, strict=True)]
        more, _, _ = self._argmax(
            hidden, [[s + i for i in extra] for s, extra in zip(starts, phrase_rows, strict=True)]
        )
        return [
            ForwardArgmax(
                {**dict(zip(plan.logit_rows + extra, first + again, strict=True)), RUNNER_UP_ROW: second}, head
            )
            for (_, plan), extra, first, again, second, head in zip(
                rows, phrase_rows, argmax, more, seconds, probs, strict=True
            )
        ]

    def _two_lm_head_calls(self, phrase_rows: int) -> bool:
        """Whether to run the lm_head twice (first where every plan reads it, then at the phrases that can still
        match) rather than once at every row: twice pays when the phrase rows it skips cost more than a second
        call's fixed cost (reading the lm_head's weights: one call costs about the same for 1 row as for 16 on
        a CPU). Decided from this runtime's own timings of its lm_head calls."""
        fit = self._lm_head_cost.fit
        if phrase_rows == 0:
            return False
        if fit is None or len(self._lm_head_cost) < 8:
            return True  # measure at every size first: both calls' sizes vary
        return fit.intercept < fit.slope * phrase_rows

    def _argmax(
        self, hidden: torch.Tensor, rows: list[list[int]], runner_ups: bool = False
    ) -> tuple[list[list[int]], list[int], list[tuple[float, float]]]:
        """The draft's argmax at these packed rows (one lm_head call, timed), in the same nesting; with
        ``runner_ups``, also its second choice at each part's first row (the only one a round reads; every part
        then has one) and its probabilities of the first and second choice there."""
        flat = [row for part in rows for row in part]
        if not flat:
            return [[] for _ in rows], [], []
        start = time.perf_counter()
        index = torch.tensor(flat, dtype=torch.long, device=self.device)
        logits = self.model.get_output_embeddings()(hidden[index])
        best = argmax_last(logits)  # argmax, not topk: the same token on ties as the draft's greedy loop
        seconds: list[int] = []
        probs: list[tuple[float, float]] = []
        if runner_ups:
            heads = torch.tensor(np.cumsum([0] + [len(part) for part in rows[:-1]]), device=self.device)
            second, head_probs = runner_up(logits[heads], best[heads])
            seconds, probs = second.tolist(), [(p1, p2) for p1, p2 in head_probs.tolist()]
        best_ids = best.tolist()  # .tolist() syncs
        self._lm_head_cost.add(len(flat), time.perf_counter() - start)
        firsts, at = [], 0
        for part in rows:
            firsts.append(best_ids[at : at + len(part)])
            at += len(part)
        return firsts, seconds, probs
