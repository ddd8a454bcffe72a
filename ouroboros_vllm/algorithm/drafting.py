"""Drafting phrase by phrase, as bookkeeping: what each draft forward carries and what it emits.

The draft model's forwards run elsewhere (:mod:`ouroboros_vllm.runtime`); this module decides, for one
request and one engine step (a :class:`DraftRound`), what goes into the next forward (:meth:`DraftRound.plan`)
and, given the draft model's argmax at the rows it asked for, which tokens that forward emits and which of its
new tokens' keys and values the draft cache keeps (:meth:`DraftRound.finish`).

Acceptance inside the draft (the paper's phrase-by-phrase drafting): ``next`` is the argmax after the last
pending token; a phrase is accepted for its longest prefix that equals ``next`` followed by the draft's own
argmax after each of its tokens, the longest such prefix over all phrases wins (ties: the first, i.e. newest,
phrase). One forward so emits 1 to N tokens, always exactly the draft model's own greedy continuation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ouroboros_vllm.algorithm.layout import forward_layout, kept_new_tokens
from ouroboros_vllm.algorithm.lookahead import LookaheadWindow, Ngram
from ouroboros_vllm.algorithm.pool import Phrase


@dataclass(eq=False)
class DraftState:
    """The draft model's side of one request, carried across its engine steps.

    ``ids`` are the tokens whose keys and values the draft's cache holds, in order; the runtime keeps exactly
    ``len(ids)`` valid cache slots for the request, so cutting ``ids`` back is all a rejection costs.
    """

    ids: list[int] = field(default_factory=list)
    window: LookaheadWindow | None = None
    cache_row: int | None = None  # the runtime's handle for this request's cache (None: none yet)

    def rewind_to(self, history: np.ndarray) -> list[int]:
        """Cut the cached ids back to what they share with ``history``; return the tokens still to feed.

        At least the last token is always fed again: its logits are the ones that predict the next token.
        """
        keep = min(common_prefix_length(self.ids, history), len(history) - 1)
        del self.ids[keep:]
        return history[keep:].tolist()


# The key under which a forward's argmax mapping also holds the draft's second choice after the last pending token
# (the runtime adds it; no new token has this index).
RUNNER_UP_ROW = -1


class ForwardArgmax(dict[int, int]):
    """One row's argmax from a draft forward (new-token index -> the draft's argmax after it), with the draft's
    probabilities of its first and second choice after the last pending token (``head_probs``, where the runtime
    computed them): how sure the draft is of the token it drafts there, and of the alternative a tree may hang
    beside it. A drafting model's probability is close to the chance that the target agrees (Qwen2.5-Coder 0.5B,
    int8, for the 1.5B over the 8 benchmark datasets: tokens drafted at 0.2-0.3 accepted 23% of the time, at
    0.5-0.6 65%, at 0.9-0.95 93%), where one rate per request says nothing of which token is the doubtful one."""

    def __init__(self, found: Mapping[int, int], head_probs: tuple[float, float] | None = None) -> None:
        super().__init__(found)
        self.head_probs = head_probs


@dataclass(frozen=True, eq=False)
class ForwardPlan:
    """One request's part of a draft forward: its new tokens after ``cached`` context tokens."""

    cached: int  # valid cache slots of the request before the forward (its new tokens' slots start here)
    pending: list[int]
    phrases: list[Phrase]
    window_tokens: list[int]  # the lookahead window's tokens, level by level (empty: no window)
    input_ids: list[int]  # pending + window + phrases
    mask: np.ndarray  # [q, q] among the new tokens, True = attend (every new token sees the whole context)
    positions: np.ndarray  # [q] absolute positions
    logit_rows: list[int]  # new tokens whose argmax is always read: the last pending token, the window's outputs

    @property
    def num_new(self) -> int:
        return len(self.input_ids)

    def phrase_rows(self, next_token: int | None = None) -> list[int]:
        """The phrase tokens whose argmax can matter once the draft's ``next_token`` (its argmax after the last
        pending token) is known: those of the phrases that start with it (every phrase's when None). The others
        are rejected at their first token, so the lm_head (a large share of a small model's forward) need not
        run on them."""
        phrase_len = len(self.phrases[0]) if self.phrases else 0
        first = len(self.pending) + len(self.window_tokens)
        return [
            first + j * phrase_len + i
            for j, phrase in enumerate(self.phrases)
            if next_token is None or phrase[0] == next_token
            for i in range(phrase_len)
        ]


@dataclass(eq=False)
class DraftRound:
    """One request's drafting in one engine step: up to ``num_tokens`` tokens of the draft model's greedy
    continuation of ``history``, phrase by phrase.

    ``phrases_for(key)`` gives the pool phrases to check after ``key`` (none: one token per forward);
    ``tails_for(previous, key)`` the tails of the pool phrases stored under ``previous`` that start with ``key``:
    guesses of what follows ``key`` that already agree with one more token of context. A forward checks the
    tails when there are any (they are few and one token shorter), else, when it may be wide, the phrases:
    most phrases are rejected at their first token, which costs a forward its width on a busy CPU.
    ``window_shape`` is the lookahead window's (levels, width) (width 0: none), whose completed N-grams go to
    ``add_ngrams`` after each forward, so the next forward can already use them.
    """

    state: DraftState
    history: np.ndarray
    num_tokens: int
    eos_token_ids: frozenset[int]
    vocab_size: int  # the draft's embedding rows: a phrase with an id past them cannot be fed
    phrases_for: Callable[[int], Sequence[Phrase]] = lambda key: ()
    tails_for: Callable[[int, int], Sequence[Phrase]] = lambda previous, key: ()
    window_shape: tuple[int, int] = (0, 0)
    add_ngrams: Callable[[list[Ngram]], None] | None = None
    drafted: list[int] = field(default_factory=list)
    runner_ups: dict[int, int] = field(default_factory=dict)  # drafted index -> the draft's second choice there
    # drafted index -> the draft's probabilities of its first and second choice there (where a forward drafted it)
    head_probs: dict[int, tuple[float, float]] = field(default_factory=dict)
    # Asked after each forward whether the round may stop before ``num_tokens`` (a tree's deeper trunk tokens would
    # not be proposed, see :func:`~ouroboros_vllm.algorithm.proposal.trunk_may_grow`); None: never early.
    stop_early: Callable[[DraftRound], bool] | None = None
    # Whether the forwards carry the pool's phrases at all (the adaptive mode drafts one token a forward for a
    # request whose phrases would cost more than they save, see :mod:`~ouroboros_vllm.algorithm.phrase_choice`).
    carry_phrases: bool = True
    forwards: int = 0
    done: bool = False
    _pending: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._pending = self.state.rewind_to(self.history)
        levels, width = self.window_shape
        if width and self.state.window is None:
            self.state.window = LookaheadWindow.from_history(self.history.tolist(), levels, width)
        self.done = self.num_tokens <= 0

    def adopt_prefix(self, length: int) -> None:
        """Before the round's first forward: the cache row now also holds ``history[:length]`` (a prefix another
        row held, copied in), so only what follows is fed. The last token is always fed (its logits predict)."""
        assert self.forwards == 0, "a prefix is adopted before the round's first forward"
        cached, length = len(self.state.ids), min(length, len(self.history) - 1)
        if length > cached:
            self.state.ids.extend(self.history[cached:length].tolist())
            self._pending = self.history[length:].tolist()

    def plan(self, wide: bool = True, tails: bool = True) -> ForwardPlan:
        """The next forward's inputs: the pending tokens, the lookahead window, then the phrases (or their tails,
        see the class docstring; without tails and not ``wide``: none; neither: one token per forward)."""
        pending = self._pending
        key = pending[-1]
        previous = pending[-2] if len(pending) > 1 else self.state.ids[-1] if self.state.ids else None
        phrases = self._phrases_after(previous, key, wide, tails) if self.carry_phrases else []
        phrase_len = len(phrases[0]) if phrases else 0
        window = self.state.window if self.window_shape[1] else None
        window_tokens = window.tokens() if window is not None else []
        levels, width = (window.num_levels, window.width) if window is not None else (0, 0)
        mask, offsets = forward_layout(len(pending), len(phrases), phrase_len, levels, width)
        window_outputs = [len(pending) + slot for slot in window.output_slots()] if window is not None else []
        input_ids = pending + window_tokens + [token for phrase in phrases for token in phrase]
        cached = len(self.state.ids)
        return ForwardPlan(
            cached=cached,
            pending=pending,
            phrases=phrases,
            window_tokens=window_tokens,
            input_ids=input_ids,
            mask=mask,
            positions=offsets + cached,
            logit_rows=[len(pending) - 1, *window_outputs],
        )

    def _phrases_after(self, previous: int | None, key: int, wide: bool = True, tails: bool = True) -> list[Phrase]:
        phrases = self._feedable(self.tails_for(previous, key)) if previous is not None and tails else []
        if not phrases and wide:
            phrases = self._feedable(self.phrases_for(key))
        return phrases

    def phrase_replay(self) -> tuple[int, int]:
        """How a lone round drafting phrase by phrase would have drafted this round's tokens: its forwards, and the
        phrase tokens they would have carried (the pool's phrases as they are now). A phrase-by-phrase forward
        emits exactly the draft's own continuation, so the drafted tokens say how far each forward's phrases would
        have reached: what phrases save is known of rounds that did not carry them too. For a round that carried
        them this is what its forwards did (the window's N-grams aside, which reach the pool during a round)."""
        tokens = [*self.history[-2:].tolist(), *self.drafted]
        before = len(tokens) - len(self.drafted)  # context tokens ahead of the drafted ones (1 or 2)
        forwards = carried = done = 0
        while done < len(self.drafted):
            at = before + done  # the next token to draft; the key is the one before it
            previous = tokens[at - 2] if at >= 2 else None
            phrases = self._phrases_after(previous, tokens[at - 1])
            ahead = np.asarray(tokens[at:])
            matched = max((common_prefix_length(phrase, ahead) for phrase in phrases), default=0)
            forwards += 1
            carried += sum(len(phrase) for phrase in phrases)
            done += matched + 1  # the matched tokens, and the draft's argmax after the last of them
        return forwards, carried

    def _feedable(self, phrases: Sequence[Phrase]) -> list[Phrase]:
        """The phrases the draft can be fed: the shared pool also holds other requests' text, which may use ids past
        the draft's embedding table (a target vocabulary padded larger than the draft's)."""
        return [p for p in phrases if p and max(p) < self.vocab_size]

    def finish(self, plan: ForwardPlan, argmax: Mapping[int, int]) -> list[int]:
        """Take the forward's argmax (new-token index -> the draft's argmax after it) at ``plan.logit_rows`` and
        ``plan.phrase_rows(next)``; return the new tokens whose keys and values the cache keeps, in token order
        (indices among the plan's new tokens; the cache then holds ``len(ids)``)."""
        emitted, kept = self._accept(plan, argmax)
        self.forwards += 1
        if RUNNER_UP_ROW in argmax:  # the forward's first token is its argmax after the last pending token
            self.runner_ups[len(self.drafted)] = argmax[RUNNER_UP_ROW]
        probs = getattr(argmax, "head_probs", None)
        if probs is not None:
            self.head_probs[len(self.drafted)] = probs
        for token in emitted:
            self.drafted.append(token)
            if token in self.eos_token_ids:
                break
        self.done = self.drafted[-1] in self.eos_token_ids or len(self.drafted) >= self.num_tokens
        del self.drafted[self.num_tokens :]  # a matched phrase can run past the budget
        if not self.done and self.stop_early is not None:
            self.done = self.stop_early(self)
        self._pending = [emitted[-1]]
        return kept

    def _accept(self, plan: ForwardPlan, argmax: Mapping[int, int]) -> tuple[list[int], list[int]]:
        phrases, pending = plan.phrases, plan.pending
        next_token = argmax[plan.logit_rows[0]]
        window = self.state.window if plan.window_tokens else None
        if window is not None:
            outputs = [argmax[row] for row in plan.logit_rows[1:]]
            ngrams = window.ngrams(pending[-1], outputs)
            window.advance(next_token, outputs)
            if self.add_ngrams is not None:
                self.add_ngrams(ngrams)
        phrase_len = len(phrases[0]) if phrases else 0
        first = len(pending) + len(plan.window_tokens)
        best, matched = None, 0
        for index, phrase in enumerate(phrases):
            start = first + index * phrase_len  # the draft's argmax after phrase token i is argmax[start + i]
            length = 0
            while length < phrase_len and phrase[length] == (next_token if length == 0 else argmax[start + length - 1]):
                length += 1
            if length > matched:  # ties: the first (newest) phrase
                best, matched = index, length
        kept = kept_new_tokens(len(pending), phrase_len, best, matched, len(plan.window_tokens))
        self.state.ids.extend(pending)
        if best is None:
            return [next_token], kept
        accepted = list(phrases[best][:matched])
        self.state.ids.extend(accepted)
        return [*accepted, argmax[first + best * phrase_len + matched - 1]], kept


def common_prefix_length(cached: Sequence[int], history: np.ndarray) -> int:
    """Length of the longest common prefix of ``cached`` and ``history``."""
    n = min(len(cached), len(history))
    if n == 0:
        return 0
    mismatch = np.flatnonzero(np.asarray(cached[:n]) != history[:n])
    return int(mismatch[0]) if mismatch.size else n
