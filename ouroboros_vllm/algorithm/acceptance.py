"""How likely the target is to accept a proposed token, learned from verification.

Per source (the draft model's trunk, the pool's suffix on the first path, and in a draft tree an alternative
branch's first token and the draft model's second choice) the model keeps one number: the chance that the next
proposed token is accepted given that every token before it was, as counts of (accepted, examined) tokens. A
verified proposal of ``m`` tokens from one source of which ``a`` were accepted examined ``min(a + 1, m)`` of
them (the target stops at the first rejection). Each request has its own counts, which start from the
process-wide rate (a prior worth :data:`PRIOR_TRIALS` examined tokens) and are kept over a decaying window, so a
request whose text gets easier or harder moves its estimate within a few steps. The process-wide rate itself
follows the recent requests (a half-life of :data:`PROCESS_HALF_LIFE` examined tokens): requests that arrive
together are often alike (one client's batch, one application's prompts), and a new request judged by the text
of an hour ago is tried where it will not pay (translation after code: expected 18 accepted tokens, got 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SOURCES = ("trunk", "pool", "branch", "runner_up")
PRIOR_TRIALS = 4.0  # a new request's estimate starts as the process-wide rate, worth this many examined tokens
DECAY = 0.9  # per verified proposal: older evidence counts for less
PROCESS_HALF_LIFE = 64.0  # examined tokens, of every request: the process-wide rate follows recent requests
# Before anything was verified: a neutral guess, so that speculation is tried and measured.
INITIAL_RATE = 0.5


@dataclass
class Rate:
    """Decayed counts of accepted and examined tokens."""

    accepted: float = 0.0
    examined: float = 0.0

    def add(self, accepted: float, examined: float, decay: float = 1.0) -> None:
        self.accepted = self.accepted * decay + accepted
        self.examined = self.examined * decay + examined

    def rate(self, prior: float, prior_trials: float = PRIOR_TRIALS) -> float:
        return (self.accepted + prior * prior_trials) / (self.examined + prior_trials)


@dataclass
class AcceptanceModel:
    """One request's acceptance estimates, per source, over a decaying window."""

    rates: dict[str, Rate] = field(default_factory=lambda: {source: Rate() for source in SOURCES})

    def record(self, source: str, proposed: int, accepted: int) -> None:
        if proposed:
            self.rates[source].add(accepted, min(accepted + 1, proposed), DECAY)

    def record_trials(self, source: str, trials: int, successes: int) -> None:
        """Independent trials (alternative branches at one node: at most one of them is right)."""
        if trials:
            self.rates[source].add(successes, trials, DECAY)

    def rate(self, source: str, prior: float) -> float:
        return self.rates[source].rate(prior)


@dataclass
class ProcessAcceptance:
    """The process-wide rates over the recent requests' examined tokens, the prior of every request."""

    rates: dict[str, Rate] = field(default_factory=lambda: {source: Rate() for source in SOURCES})
    pool_hits: Rate = field(default_factory=Rate)  # suffix lookups that found one

    def record(self, source: str, proposed: int, accepted: int) -> None:
        if proposed:
            self.record_trials(source, min(accepted + 1, proposed), accepted)

    def record_trials(self, source: str, trials: int, successes: int) -> None:
        if trials:
            self.rates[source].add(successes, trials, 0.5 ** (trials / PROCESS_HALF_LIFE))

    def prior(self, source: str) -> float:
        return self.rates[source].rate(INITIAL_RATE, prior_trials=1.0)


def expected_accepted(rate: float, length: int) -> float:
    """Expected accepted tokens of a proposal of ``length`` tokens whose each token is accepted with chance
    ``rate`` given the ones before it: ``rate + rate^2 + ... + rate^length``."""
    if length <= 0 or rate <= 0:
        return 0.0
    if rate >= 1:
        return float(length)
    return rate * (1 - rate**length) / (1 - rate)
