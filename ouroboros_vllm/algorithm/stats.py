"""Counters of the proposer, per request and for the whole process, and their periodic log line."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ouroboros_vllm.algorithm.planner import RowPlan

logger = logging.getLogger(__name__)


@dataclass
class DraftStats:
    """Counts that add up over rounds. ``tau`` is vLLM's "mean acceptance length": tokens per target step."""

    steps: int = 0  # engine steps that drafted for at least one request (process-wide only)
    rounds: int = 0  # proposals made (one per request per engine step that drafted for it)
    proposed_tokens: int = 0  # tokens returned to vLLM
    suffix_tokens: int = 0  # of which from pool phrases (candidate suffixes)
    verified_rounds: int = 0  # proposals the target verified
    verified_tokens: int = 0  # draft tokens the target verified (vLLM may schedule fewer than proposed)
    accepted_tokens: int = 0  # draft tokens the target accepted
    suffix_accepted_tokens: int = 0  # of which from pool phrases
    # Pool suffix tokens from phrases that matched the chain on more than their key (proposed, counted once the
    # target has answered the proposal, and accepted): how much the longer match is worth against the key-only
    # fallback.
    matched_suffix_tokens: int = 0
    matched_suffix_accepted_tokens: int = 0
    # Pool suffix tokens on the first path from phrases that matched the chain on their key alone (proposed, counted
    # when the target has answered, and accepted); the other key-only ones are on a tree's alternative branches.
    first_path_key_only_tokens: int = 0
    first_path_key_only_accepted_tokens: int = 0
    # Tree verification: proposals verified as trees (with alternative branches), their alternative-branch
    # tokens, the rounds whose accepted path took an alternative, and the tokens accepted on one.
    tree_rounds: int = 0
    tree_choice_rounds: int = 0  # proposals that could be trees ("tree", or "auto" at a batch size where they pay)
    branch_tokens: int = 0
    branch_rounds: int = 0
    branch_accepted_tokens: int = 0
    # Rounds whose accepted path took a pool candidate at the trunk's end, by the candidate's rank (0: the first
    # path's suffix, k: the k-th alternative branch).
    accepted_rank: dict[int, int] = field(default_factory=dict)
    draft_forwards: int = 0
    # Rounds whose draft forwards carried the pool's phrases (drafting phrase by phrase; the adaptive mode drafts
    # one token a forward for a request whose phrases would not pay).
    phrase_rounds: int = 0
    draft_seconds: float = 0.0  # wall time of the steps' drafting (a step's time is shared among its rounds)

    def add(self, other: DraftStats) -> None:
        # Every row adds its counts a few times a step, most of them zero: only the counts that are not (no
        # dataclasses.fields() nor a getattr per field here).
        mine = self.__dict__
        for name, value in other.__dict__.items():
            if value and name != "accepted_rank":
                mine[name] += value
        for key, count in other.accepted_rank.items():
            self.accepted_rank[key] = self.accepted_rank.get(key, 0) + count

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.verified_tokens if self.verified_tokens else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verified target step: accepted drafts plus the target's own token."""
        return (self.accepted_tokens + self.verified_rounds) / self.verified_rounds if self.verified_rounds else 0.0

    @property
    def draft_forwards_per_round(self) -> float:
        return self.draft_forwards / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_draft_forward(self) -> float:
        """Draft-model tokens per draft forward (pool suffixes cost no forward and are not counted)."""
        trunk = self.proposed_tokens - self.suffix_tokens
        return trunk / self.draft_forwards if self.draft_forwards else 0.0

    def _tree_summary(self) -> str:
        if not self.tree_choice_rounds:
            return ""
        return (
            f"{self.tree_rounds} trees of {self.tree_choice_rounds} proposals that could be trees, "
            f"an alternative branch taken {self.branch_rounds} times "
            f"({self.branch_accepted_tokens}/{self.branch_tokens} branch tokens accepted; accepted candidate by "
            f"rank {dict(sorted(self.accepted_rank.items()))}), "
        )

    def _phrase_summary(self) -> str:
        if not self.phrase_rounds:
            return ""
        return f"{self.phrase_rounds / max(self.rounds, 1):.0%} of rounds drafted phrase by phrase, "

    def summary(self) -> str:
        return (
            f"tau {self.tau:.2f}, acceptance {self.acceptance_rate:.1%} "
            f"({self.accepted_tokens}/{self.verified_tokens} draft tokens), "
            f"{self.suffix_tokens / max(self.proposed_tokens, 1):.1%} of proposed tokens from the pool "
            f"({self.suffix_accepted_tokens} accepted; context-matched {self.matched_suffix_accepted_tokens}/"
            f"{self.matched_suffix_tokens}), "
            + self._tree_summary()
            + self._phrase_summary()
            + f"{self.tokens_per_draft_forward:.2f} tokens per draft forward, "
            f"{1000 * self.draft_seconds / max(self.rounds, 1):.1f} ms drafting per round"
            + (f", {1000 * self.draft_seconds / self.steps:.1f} ms per engine step" if self.steps else "")
        )


@dataclass
class AdaptiveStats:
    """What the plans did, since the engine started."""

    planned_steps: int = 0
    probe_steps: int = 0  # steps that measured the target's cost per token
    explore_steps: int = 0  # steps that drafted against the plan, to measure the draft again
    catch_ups_declined: int = 0  # row-steps the draft model sat out because its catch-up would not pay
    guard_plain_steps: int = 0  # steps run plain because speculation measured slower there (yield_guard)
    lengths: dict[int, int] = field(default_factory=dict)  # tokens proposed per row -> rows
    predicted_seconds: float = 0.0  # of the steps whose time was then measured
    measured_seconds: float = 0.0
    predicted_accepted: float = 0.0  # draft tokens the plans expected accepted, of the steps then verified
    verified_accepted: int = 0  # and what the target accepted of them

    def count_lengths(self, rows: Sequence[RowPlan]) -> None:
        for row in rows:
            self.lengths[row.total] = self.lengths.get(row.total, 0) + 1

    def histogram(self) -> str:
        return " ".join(f"{length}:{count}" for length, count in sorted(self.lengths.items()))


class StatsLogger:
    """Logs the process-wide stats at most once every ``interval_s`` seconds (0: never)."""

    def __init__(self, interval_s: float, log: logging.Logger = logger) -> None:
        self.interval_s = interval_s
        self.log = log
        self._last = time.monotonic()

    def maybe_log(self, summary: Callable[[], str]) -> None:
        """Log ``summary()`` if the interval has passed (the line is only built when it is logged)."""
        now = time.monotonic()
        if self.interval_s and now - self._last >= self.interval_s:
            self._last = now
            self.log.info("ouroboros-vllm: %s", summary())
