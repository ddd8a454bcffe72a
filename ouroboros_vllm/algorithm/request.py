"""One request's Ouroboros state and the verbs of its life: start a round, finish it, take the verification.

A step of the engine, seen from one request::

    state.count_accepted(sampled)                   -> what the target accepted of the last proposal
    state.start_round(history, trunk, info, budget) -> a DraftRound for the draft model (or None)
    ... the runtime runs the round's forwards (shared with the step's other requests) ...
    state.finish_round(round, history, budget)      -> the proposal's tokens (trunk + pool suffixes, or a tree)
    ... the target verifies them in the next engine step ...
    state.after_verification(verified, argmax)      -> inspiration and refinement into the pool

Nothing here sees a tensor: the draft model's work is a :class:`~ouroboros_vllm.algorithm.drafting.DraftRound`
that the runtime executes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ouroboros_vllm.algorithm.acceptance import DECAY, INITIAL_RATE, AcceptanceModel, ProcessAcceptance, Rate
from ouroboros_vllm.algorithm.cost_model import LinearCost
from ouroboros_vllm.algorithm.drafting import DraftRound, DraftState
from ouroboros_vllm.algorithm.lengths import OutputLengths
from ouroboros_vllm.algorithm.phrase_choice import PhraseJudge
from ouroboros_vllm.algorithm.planner import RowOutlook
from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.proposal import (
    Proposal,
    TreeRates,
    apply_feedback,
    context_ngrams,
    lengthen,
    lengthen_tree,
    suffix_counts,
    trunk_may_grow,
)
from ouroboros_vllm.algorithm.stats import DraftStats
from ouroboros_vllm.algorithm.tree import ROOT, accepted_path


@dataclass(frozen=True)
class DraftSettings:
    """What the algorithm needs of the plugin's settings, resolved for one K."""

    gamma: int  # draft-model tokens per round (the trunk)
    phrase_len: int  # N - 1
    draft_phrases: int  # pool phrases per draft forward (0: one token per forward)
    lookahead_window: int  # W (0: no window)
    uses_pool: bool  # lengthen with pool suffixes and feed the pool back
    context_ngrams: bool  # feed the pool the request's own N-grams
    num_candidates: int = 1  # pool candidates at the trunk's end: the first, and the rest as tree branches


@dataclass(frozen=True)
class DraftModelInfo:
    """What the algorithm needs to know of the draft model."""

    vocab_size: int
    eos_token_ids: frozenset[int]


@dataclass(eq=False)
class RequestState:
    """Everything Ouroboros keeps for one request; dropped when the request finishes or is aborted."""

    settings: DraftSettings
    pool: PhrasePool  # the shared pool, or a pool of the request's own (cold)
    cold: bool = False  # drafts from a pool of its own and alone (see the proposer)
    prior: ProcessAcceptance | None = None  # the process-wide acceptance rates, fed by every request
    draft: DraftState = field(default_factory=DraftState)
    stats: DraftStats = field(default_factory=DraftStats)
    proposal: Proposal = field(default_factory=Proposal)  # the last proposal, awaiting or after verification
    pooled_upto: int = 0  # the request's tokens up to here have given their N-grams to the pool
    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)  # this request's, per source
    pool_hits: Rate = field(default_factory=Rate)  # lookups for a suffix that found one
    max_tokens: int | None = None  # the most tokens the request may emit (its SamplingParams), None: not known
    emitted: int = 0  # tokens the target has emitted for the request so far
    takes_tree: bool = False  # tree verification is on and the request's sampling lets its drafts be trees
    tree: bool = False  # this step's proposal may be a tree (it takes trees, and they pay at the step's batch size)
    phrases: PhraseJudge = field(default_factory=PhraseJudge)  # whether its draft forwards carry pool phrases

    def count_accepted(self, sampled: Sequence[int]) -> DraftStats:
        """A new engine step: what the target accepted of the last proposal (``sampled``: the tokens vLLM just
        appended, the accepted path and one token of the target's). Returns the counts to add."""
        self.emitted += len(sampled)
        proposal, self.proposal = self.proposal, Proposal()
        if not (proposal.tokens and sampled):
            return DraftStats()
        tree = proposal.tree() if proposal.verified_as_tree else None
        if tree is not None:
            path, first_path = accepted_path(tree, sampled), tree.first_path_len()
        else:
            path, first_path = list(range(min(len(sampled) - 1, len(proposal.tokens)))), len(proposal.tokens)
        trunk = proposal.trunk_len
        accepted_trunk = sum(node < trunk for node in path)
        self._record_acceptance("trunk", trunk, accepted_trunk)
        if self.prior is not None:  # the trunk tokens the target examined: the accepted ones and the first rejected
            examined = [(p, i < accepted_trunk) for i, p in enumerate(proposal.trunk_probs[: accepted_trunk + 1])]
            self.prior.first_choice.record(*_known(examined))
        counts = DraftStats(accepted_tokens=len(path), suffix_accepted_tokens=len(path) - accepted_trunk)
        if tree is not None:
            taken = [node for node in path if node >= first_path]
            counts.tree_rounds, counts.branch_tokens = 1, len(proposal.tokens) - first_path
            counts.branch_rounds, counts.branch_accepted_tokens = int(bool(taken)), len(taken)
            # The draft's second choices that the target reached (their parent accepted), and whether one was taken.
            reached = [node for node in proposal.runner_ups if tree.parents[node] in (ROOT, *path)]
            self._record_trials("runner_up", len(reached), sum(node in path for node in reached))
            if self.prior is not None and proposal.runner_up_probs:
                probs = dict(zip(proposal.runner_ups, proposal.runner_up_probs, strict=True))
                self.prior.second_choice.record(*_known([(probs[node], node in path) for node in reached]))
            counts.suffix_accepted_tokens -= sum(node in path for node in reached)
        if accepted_trunk == trunk:  # the target reached the suffixes
            suffix_accepted = sum(trunk <= node < first_path for node in path)
            for source in ("pool", "pool_key_only") if proposal.key_only_suffix else ("pool",):
                self._record_acceptance(source, first_path - trunk, suffix_accepted)
            if tree is not None:
                pool_taken = any(node >= first_path and node not in proposal.runner_ups for node in path)
                self._record_trials("branch", proposal.alternatives, int(pool_taken))
            if len(path) > trunk:
                rank = next((use.rank for use in reversed(proposal.suffixes) if use.offset <= path[trunk]), 0)
                counts.accepted_rank[rank] = 1
        counts.add(suffix_counts(proposal, path))
        return counts

    def _record_trials(self, source: str, trials: int, successes: int) -> None:
        self.acceptance.record_trials(source, trials, successes)
        if self.prior is not None:
            self.prior.record_trials(source, trials, successes)

    def _record_acceptance(self, source: str, proposed: int, accepted: int) -> None:
        if self.prior is not None:  # the profile by position compares with the rate the proposal was made at
            self.prior.record(source, proposed, accepted, self.acceptance.rate(source, self.prior.prior(source)))
        self.acceptance.record(source, proposed, accepted)

    @property
    def remaining(self) -> int | None:
        """Tokens the request may still emit (None: not known)."""
        return None if self.max_tokens is None else max(self.max_tokens - self.emitted, 0)

    @property
    def output_length(self) -> int:
        """Tokens emitted so far as the output counts them (a step's accepted drafts may run past max_tokens)."""
        return self.emitted if self.max_tokens is None else min(self.emitted, self.max_tokens)

    def expected_remaining(self, lengths: OutputLengths) -> float | None:
        """Tokens the request is expected to still emit, from what recent requests emitted (None: not known)."""
        return lengths.expected_remaining(self.emitted, self.remaining)

    def branch_rate(self) -> float:
        """The chance that an alternative branch's first token is the target's."""
        prior = self.prior or ProcessAcceptance()
        return self.acceptance.rate("branch", prior.prior("branch"))

    def tree_rates(self) -> TreeRates:
        prior = self.prior or ProcessAcceptance()
        trunk, pool, _ = self.rates()
        runner_up, key_only = (self.acceptance.rate(s, prior.prior(s)) for s in ("runner_up", "pool_key_only"))
        return TreeRates(trunk, pool, self.branch_rate(), runner_up, key_only)

    def rates(self) -> tuple[float, float, float]:
        """(trunk acceptance, pool acceptance, pool hit rate): this request's, leaning on the process's."""
        prior = self.prior or ProcessAcceptance()
        hit_prior = prior.pool_hits.rate(INITIAL_RATE, prior_trials=1.0)
        return (
            self.acceptance.rate("trunk", prior.prior("trunk")),
            self.acceptance.rate("pool", prior.prior("pool")),
            self.pool_hits.rate(hit_prior),
        )

    def outlook(
        self, budget: int, can_draft: bool, catch_up: float, lengths: OutputLengths, uses_pool: bool
    ) -> RowOutlook:
        """What the step planner knows of the request: at most ``budget`` tokens, the draft model serving it or not,
        ``catch_up`` tokens its cache lacks, and its acceptance estimates with the process's profiles."""
        trunk_rate, pool_rate, pool_hit = self.rates()
        prior = self.prior or ProcessAcceptance()
        return RowOutlook(
            budget,
            trunk_rate,
            pool_rate if uses_pool else 0.0,
            pool_hit if uses_pool else 0.0,
            can_draft=can_draft,
            catch_up=catch_up,
            untried=self.acceptance.rates["trunk"].examined == 0,
            remaining=self.expected_remaining(lengths),
            alternatives=self.settings.num_candidates - 1 if uses_pool and self.tree else 0,
            branch_len=self.settings.phrase_len,
            branch_rate=self.branch_rate(),
            trunk_offsets=prior.offsets("trunk"),
            pool_offsets=prior.offsets("pool"),
        )

    def start_round(
        self,
        history: np.ndarray,
        trunk: int,
        draft_model: DraftModelInfo | None,
        budget: int | None = None,
        phrase_price: LinearCost | None = None,
        sharers: int = 1,
    ) -> DraftRound | None:
        """Begin proposing after ``history``: feed the pool the request's new N-grams and return the draft model's
        round of ``trunk`` tokens (None without a draft model or a trunk). A tree of ``budget`` nodes stops the
        round early once a deeper trunk token could not be proposed (:func:`trunk_may_grow`). ``phrase_price``: a
        draft forward's seconds by the tokens it carries, shared by ``sharers`` drafting rows; with it the round
        carries the pool's phrases only where they pay (:mod:`.phrase_choice`), without it always."""
        if self.settings.uses_pool and self.settings.context_ngrams:
            self.pool.insert_many(context_ngrams(history, self.pooled_upto, self.settings.phrase_len))
            self.pooled_upto = len(history)
        if draft_model is None or trunk <= 0:
            return None
        round_ = DraftRound(self.draft, history, trunk, draft_model.eos_token_ids, draft_model.vocab_size)
        if self.settings.draft_phrases:
            pool, count = self.pool, self.settings.draft_phrases
            round_.phrases_for = lambda key: pool.newest(key, count)
            round_.tails_for = lambda previous, key: pool.tails(previous, key, count)
            round_.window_shape = (self.settings.phrase_len, self.settings.lookahead_window)
            round_.add_ngrams = pool.insert_many
            round_.carry_phrases = self.phrases.start(phrase_price, sharers)
        if self.tree and budget is not None:
            trunk_rate = self.rates()[0]
            round_.stop_early = lambda r: not trunk_may_grow(*self._draft_chances(r), budget, trunk_rate)
        return round_

    def _draft_chances(self, round_: DraftRound) -> tuple[list[float], dict[int, float]]:
        """The chance that the target takes each drafted token given the ones before it, and each second choice
        the round kept (by drafted index): from the draft's probabilities, calibrated, where the draft gave them
        (the request's trunk rate and the process's second-choice rate elsewhere)."""
        prior = self.prior or ProcessAcceptance()
        trunk_rate = self.rates()[0]
        first = [
            prior.first_choice.chance(round_.head_probs[i][0]) if i in round_.head_probs else trunk_rate
            for i in range(len(round_.drafted))
        ]
        probs = round_.head_probs
        second = {i: prior.second_choice.chance(probs[i][1]) for i in round_.runner_ups if i in probs}
        return first, second

    def finish_round(
        self, round_: DraftRound | None, history: np.ndarray, budget: int, trunk: int | None = None
    ) -> tuple[list[int], DraftStats]:
        """The proposal: the draft model's tokens (the first ``trunk`` of them, default all), lengthened from the
        pool up to ``budget`` tokens (not past an end of sequence), as a tree where the request may take one; and
        the counts to add."""
        if round_ is not None:
            self.phrases.finish(round_)
        drafted = round_.drafted[:trunk] if round_ is not None else []
        proposal = Proposal(tokens=list(drafted), trunk_len=len(drafted))
        ends_sequence = round_ is not None and bool(drafted) and drafted[-1] in round_.eos_token_ids
        pool = self.pool if self.settings.uses_pool and not ends_sequence else None  # nothing follows an EOS
        runner_ups = round_.runner_ups if round_ is not None else {}
        if self.tree and (pool is not None or runner_ups):
            first, second = self._draft_chances(round_) if round_ is not None else (None, None)
            candidates = self.settings.num_candidates
            lengthen_tree(pool, proposal, history, budget, candidates, self.tree_rates(), runner_ups, first, second)
        elif pool is not None and len(drafted) < budget:
            lengthen(pool, proposal, history, budget)
        if pool is not None and len(drafted) < budget:
            found = int(bool(proposal.suffixes))
            self.pool_hits.add(found, 1, DECAY)
            if self.prior is not None:
                self.prior.pool_hits.add(found, 1)
        if round_ is not None:
            probs = [round_.head_probs.get(i) for i in range(proposal.trunk_len)]
            proposal.trunk_probs = [p[0] if p else None for p in probs]
            parents = proposal.parents or []
            seconds = [round_.head_probs.get(parents[node] + 1) for node in proposal.runner_ups]
            proposal.runner_up_probs = [p[1] if p else None for p in seconds]
        self.proposal = proposal
        counts = DraftStats(
            rounds=1,
            proposed_tokens=len(proposal.tokens),
            suffix_tokens=len(proposal.tokens) - proposal.trunk_len - len(proposal.runner_ups),
            tree_choice_rounds=int(self.tree),
            draft_forwards=round_.forwards if round_ is not None else 0,
            phrase_rounds=int(round_ is not None and bool(self.settings.draft_phrases) and round_.carry_phrases),
        )
        return proposal.tokens, counts

    def after_verification(
        self, verified: Sequence[int], target_argmax: Sequence[int], as_tree: bool = False
    ) -> DraftStats:
        """The target verified ``verified`` (the proposal, or the part vLLM scheduled), as the proposal's tree or
        as a chain; ``target_argmax`` is its argmax at each row of that forward (the root's, then one per token).
        Feeds the pool back; returns the counts to add."""
        if not verified:
            return DraftStats()
        self.proposal.verified_as_tree = as_tree and self.proposal.parents is not None
        if self.settings.uses_pool:
            apply_feedback(self.pool, self.proposal, verified, target_argmax)
        return DraftStats(verified_rounds=1, verified_tokens=len(verified))


def _known(verdicts: Sequence[tuple[float | None, bool]]) -> tuple[list[float], list[bool]]:
    """The (probability, accepted) pairs whose probability the draft gave, as two lists."""
    known = [(p, ok) for p, ok in verdicts if p is not None]
    return [p for p, _ in known], [ok for _, ok in known]
