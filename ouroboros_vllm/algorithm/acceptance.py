"""How likely the target is to accept a proposed token, learned from verification.

Per source (the draft model's trunk, the pool's suffix on the first path, that suffix again when its phrase matched
the chain on its key alone, and in a draft tree an alternative branch's first token and the draft model's second
choice) the model keeps one number: the chance that the next proposed token is accepted given that every token
before it was, as counts of (accepted, examined) tokens. A verified proposal of ``m`` tokens from one source of
which ``a`` were accepted examined ``min(a + 1, m)`` of them (the target stops at the first rejection). Each request
has its own counts, which start from the process-wide rate (a prior worth :data:`PRIOR_TRIALS` examined tokens) and
are kept over a decaying window, so a request whose text gets easier or harder moves its estimate within a few
steps. The process-wide rate itself follows the recent requests (a half-life of :data:`PROCESS_HALF_LIFE` examined
tokens): requests that arrive together are often alike (one client's batch, one application's prompts), and a new
request judged by the text of an hour ago is tried where it will not pay (translation after code: expected 18
accepted tokens, got 3).

One number per source says nothing of where in a proposal a token sits, and that matters: a round's tokens are
alike (an easy passage is easy for all of them), so a trunk token that follows three accepted ones is likelier to
be accepted than the first (MT-Bench, measured: 0.73, 0.78, 0.82, 0.86 by depth), and a pool suffix's first token
is the one that says whether the suffix fits at all (0.31, then 0.69 and 0.86). The process therefore also keeps,
for the trunk and the pool, a profile by position: at each position, how much likelier (in log-odds) a token that
the target reached was accepted than the request's own rate said when it was proposed. Measured against each
row's own rate, a deep position's count is not inflated by the rows that reach it being the easy ones, and the
profile changes slowly (a half-life of :data:`PROFILE_HALF_LIFE` examined tokens) while the level stays per request.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# "pool" counts every first-path suffix (what the planner prices a suffix at before knowing which phrase it will get);
# "pool_key_only" the ones whose phrase matched nothing but its key, the weak kind (2-11% accepted in every benchmark
# run, against 20-55% for phrases that matched more context), which a draft tree prices apart.
SOURCES = ("trunk", "pool", "pool_key_only", "branch", "runner_up")
PRIOR_TRIALS = 4.0  # a new request's estimate starts as the process-wide rate, worth this many examined tokens
DECAY = 0.9  # per verified proposal: older evidence counts for less
PROCESS_HALF_LIFE = 64.0  # examined tokens, of every request: the process-wide rate follows recent requests
# Before anything was verified: a neutral guess, so that speculation is tried and measured.
INITIAL_RATE = 0.5
PROFILED = ("trunk", "pool")  # the sources whose acceptance is kept by position too
POSITIONS = 8  # positions a profile tells apart; deeper ones share the last
PROFILE_HALF_LIFE = 1024.0  # examined tokens of the source: a profile's shape moves slowly
# A position's offset is shrunk toward 0 (the request's own rate) as if this many tokens had been accepted at
# exactly that rate: a position examined a few times says little.
PROFILE_PRIOR_TRIALS = 16.0
PROFILE_CLIP = 1e-4  # rates are kept in [clip, 1 - clip] before taking log-odds
# The bins of a drafting model's probability in which its calibration is learned: finer near 1, where most drafted
# tokens are (half of them above 0.95 on the benchmark datasets) and where a few points of error compound over a
# deep trunk.
PROBABILITY_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
CALIBRATION_PRIOR_TRIALS = 16.0  # a bin's correction is shrunk toward none as if this many tokens agreed with p
CALIBRATION_HALF_LIFE = 2048.0  # examined tokens: a calibration follows the recent requests' text


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

    profiles: dict[str, PositionProfile] = field(default_factory=lambda: {s: PositionProfile() for s in PROFILED})
    # The chance that the target takes the draft model's first choice, and its second where the target reached it,
    # as a function of the draft's probability of it.
    first_choice: ProbabilityCalibration = field(default_factory=lambda: ProbabilityCalibration())
    second_choice: ProbabilityCalibration = field(default_factory=lambda: ProbabilityCalibration())

    def record(self, source: str, proposed: int, accepted: int, expected_rate: float | None = None) -> None:
        """A proposal of ``proposed`` tokens from ``source`` of which the target accepted ``accepted``; its request
        expected each token to be accepted with chance ``expected_rate`` (None: the profile learns nothing)."""
        if proposed:
            self.record_trials(source, min(accepted + 1, proposed), accepted)
            if expected_rate is not None and source in self.profiles:
                self.profiles[source].record(proposed, accepted, expected_rate)

    def record_trials(self, source: str, trials: int, successes: int) -> None:
        if trials:
            self.rates[source].add(successes, trials, 0.5 ** (trials / PROCESS_HALF_LIFE))

    def prior(self, source: str) -> float:
        return self.rates[source].rate(INITIAL_RATE, prior_trials=1.0)

    def offsets(self, source: str) -> tuple[float, ...]:
        """The source's profile (see :class:`PositionProfile`); () for a source without one."""
        profile = self.profiles.get(source)
        return profile.offsets() if profile is not None else ()


class PositionProfile:
    """Per position of a proposal (1..:data:`POSITIONS`): decayed counts of the tokens the target examined there,
    of those it accepted, and of the acceptances their requests' rates predicted. :meth:`offsets` turns them into
    log-odds offsets to add to a request's rate at each position."""

    def __init__(self) -> None:
        self._counts = np.zeros((3, POSITIONS))  # examined, accepted, predicted
        self._offsets: tuple[float, ...] | None = (0.0,) * POSITIONS

    def record(self, proposed: int, accepted: int, expected_rate: float) -> None:
        examined = min(accepted + 1, proposed)
        self._counts *= 0.5 ** (examined / PROFILE_HALF_LIFE)
        # Positions past the last one tell apart share its counts.
        positions = np.minimum(np.arange(examined), POSITIONS - 1)
        np.add.at(self._counts[0], positions, 1.0)
        np.add.at(self._counts[1], positions[:accepted], 1.0)
        np.add.at(self._counts[2], positions, expected_rate)
        self._offsets = None

    def offsets(self) -> tuple[float, ...]:
        """Log-odds to add to a request's rate at positions 1..:data:`POSITIONS`: the accepted fraction at each
        position against the one its requests' rates predicted, both with :data:`PROFILE_PRIOR_TRIALS` tokens at
        the predicted rate mixed in (an unexamined position's offset is 0)."""
        if self._offsets is None:
            examined, accepted, predicted = self._counts
            predicted_rate = np.where(examined > 0, predicted / np.maximum(examined, 1e-12), INITIAL_RATE)
            observed = (accepted + PROFILE_PRIOR_TRIALS * predicted_rate) / (examined + PROFILE_PRIOR_TRIALS)
            self._offsets = tuple(float(x) for x in _logit(observed) - _logit(predicted_rate))
        return self._offsets


class ProbabilityCalibration:
    """The chance that the target accepts a token the draft model gave probability ``p``: ``p`` itself, corrected
    per bin of ``p`` (:data:`PROBABILITY_EDGES`) by how many more (or fewer) of the bin's examined tokens the target
    accepted than their probabilities said, shrunk as if :data:`CALIBRATION_PRIOR_TRIALS` more had agreed.

    Learned from every verified token whose probability the draft gave (process-wide: a request examines too few to
    calibrate on its own), over the recent :data:`CALIBRATION_HALF_LIFE` of them. A draft distilled from or sharing
    its target's training is close to calibrated already (Qwen2.5-Coder 0.5B for the 1.5B: within 0.06 in every bin
    of the 8 benchmark datasets); another pair's draft may be confidently wrong, which the correction learns."""

    def __init__(self) -> None:
        bins = len(PROBABILITY_EDGES) - 1
        # Per bin: examined tokens, accepted ones, the sum of their probabilities (decayed), and the correction they
        # make. Plain lists: a few tokens are recorded per request and step, and read once per drafted token.
        self._examined, self._accepted, self._predicted = [0.0] * bins, [0.0] * bins, [0.0] * bins
        self._corrections = [0.0] * bins

    def record(self, probs: Sequence[float], accepted: Sequence[bool]) -> None:
        if not len(probs):
            return
        decay = 0.5 ** (len(probs) / CALIBRATION_HALF_LIFE)
        for counts in (self._examined, self._accepted, self._predicted):
            counts[:] = [count * decay for count in counts]
        for prob, ok in zip(probs, accepted, strict=True):
            b = _bin(prob)
            self._examined[b] += 1.0
            self._accepted[b] += float(ok)
            self._predicted[b] += prob
        self._corrections = [
            (accepted_ - predicted) / (examined + CALIBRATION_PRIOR_TRIALS)
            for examined, accepted_, predicted in zip(self._examined, self._accepted, self._predicted, strict=True)
        ]

    def chance(self, prob: float) -> float:
        return min(max(prob + self._corrections[_bin(prob)], 0.0), 1.0)


def _bin(prob: float) -> int:
    return min(max(bisect.bisect_right(PROBABILITY_EDGES, prob) - 1, 0), len(PROBABILITY_EDGES) - 2)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, PROFILE_CLIP, 1 - PROFILE_CLIP)
    return np.log(p / (1 - p))


def conditional_rates(rates: np.ndarray, offsets: tuple[float, ...] | np.ndarray, length: int) -> np.ndarray:
    """[len(rates), length]: the chance that the token at position 1..length of a proposal is accepted given the
    ones before it, for rows whose rate is ``rates`` and whose profile is ``offsets`` (positions past the profile
    take its last offset; no offsets: the rate at every position)."""
    rates = np.asarray(rates, dtype=np.float64)
    if length <= 0:
        return np.zeros((len(rates), 0))
    if not len(offsets) or not np.any(offsets):
        return np.broadcast_to(rates[:, None], (len(rates), length))
    shift = np.asarray(offsets[:length], dtype=np.float64)
    shift = np.concatenate([shift, np.full(length - len(shift), shift[-1])])
    return 1.0 / (1.0 + np.exp(-(_logit(rates)[:, None] + shift[None, :])))


def reach_chances(rates: np.ndarray, offsets: tuple[float, ...] | np.ndarray, length: int) -> np.ndarray:
    """[len(rates), length + 1]: the chance that the first q = 0..length tokens of a proposal are all accepted
    (:func:`conditional_rates`' running product; q = 0 is 1)."""
    conditional = conditional_rates(rates, offsets, length)
    return np.concatenate([np.ones((len(conditional), 1)), np.cumprod(conditional, axis=1)], axis=1)


def expected_accepted(rate: float, length: int) -> float:
    """Expected accepted tokens of a proposal of ``length`` tokens whose each token is accepted with chance
    ``rate`` given the ones before it: ``rate + rate^2 + ... + rate^length``."""
    if length <= 0 or rate <= 0:
        return 0.0
    if rate >= 1:
        return float(length)
    return rate * (1 - rate**length) / (1 - rate)
