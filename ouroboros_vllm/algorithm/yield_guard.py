"""What speculation yielded against plain decoding, measured, per batch size: the planner's safety net.

The planner's model leaves costs out (a row's catch-up, a new request's first full trunk, the probes) and its
prices can be off; what a step finally yields is measured. For each speculative decoding step,
:class:`YieldGuard` sets the seconds it took (the target's step and the drafting before it) against the seconds
plain decoding would have taken to emit the same tokens (a plain step's measured time at that batch size per row
emitted), in decayed sums per batch-size bucket (1, 2, 3-4, 5-8, 9-16, ... rows: neighbouring sizes share their
evidence, since speculative steps may be few). Once speculation there has taken longer than plain decoding
would have, steps in that bucket run plain whatever the plan, except for a burst of speculative steps now and
then, paid out of a small share of the time run plain, which finds out whether speculation pays again.

Measured through the server at 8 concurrent requests on a 2-core CPU, where a verified token costs half of what a
plain step emits a token in: the planner's steps, with their catch-ups and trials, ran at 0.86-0.88x plain.
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.95  # per speculative step added: about the last 20 of them
MIN_STEPS = 6.0  # decayed speculative steps in a bucket before the guard judges it (seven steps)
EXPLORE_SHARE = 0.02  # of the time run plain while speculation loses, spent on bursts that measure it again
BURST = 8  # speculative steps a burst takes: a lone step would mostly measure the rows' catch-ups


def bucket(rows: int) -> int:
    """1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, 9-16 -> 4, ..."""
    return (rows - 1).bit_length()


@dataclass
class _Bucket:
    seconds: float = 0.0  # speculative steps' measured seconds, decayed
    plain_seconds: float = 0.0  # what plain decoding would have taken to emit their tokens, decayed alike
    steps: float = 0.0
    credit: float = 0.0  # seconds of exploration earned while speculation lost
    burst: int = 0  # speculative steps left in the burst under way

    def speedup(self) -> float:
        return self.plain_seconds / self.seconds if self.seconds > 0 else 1.0


class YieldGuard:
    """Per batch-size bucket: whether steps may speculate, from what the speculative ones measured."""

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}
        self.plain_steps = 0  # steps the guard ran plain (the planner's plan set aside)

    def observe(self, rows: int, speculative: bool, seconds: float, plain_seconds: float) -> None:
        """A decoding step of ``rows`` rows took ``seconds`` (its drafting included); plain decoding would have
        taken ``plain_seconds`` to emit its tokens (for a plain step, about ``seconds``)."""
        if rows <= 0 or seconds <= 0:
            return
        size = self._buckets.setdefault(bucket(rows), _Bucket())
        if speculative:
            size.seconds = size.seconds * DECAY + seconds
            size.plain_seconds = size.plain_seconds * DECAY + plain_seconds
            size.steps = size.steps * DECAY + 1.0
        elif self.losing(rows):
            size.credit += EXPLORE_SHARE * seconds

    def losing(self, rows: int) -> bool:
        """Whether speculation at about this batch size has taken longer than plain decoding would have."""
        size = self._buckets.get(bucket(rows))
        return size is not None and size.steps >= MIN_STEPS and size.speedup() < 1.0

    def allows(self, rows: int) -> bool:
        """Whether this step, of ``rows`` rows, may speculate (called once per step whose plan proposes)."""
        if not self.losing(rows):
            return True
        size = self._buckets[bucket(rows)]
        burst_cost = BURST * (size.seconds - size.plain_seconds) / size.steps  # what 8 such steps lose
        if size.burst == 0 and size.credit >= burst_cost:
            size.credit -= burst_cost
            size.burst = BURST
        if size.burst > 0:
            size.burst -= 1
            return True
        self.plain_steps += 1
        return False

    def summary(self, rows: int) -> str:
        """For the log line: the speculative steps' measured speedup about ``rows`` rows, the steps run plain."""
        size = self._buckets.get(bucket(rows))
        if size is None or not size.steps:
            return ""
        ratio = f"{size.speedup():.2f}"
        return f", speculative steps' speedup at {rows} rows {ratio}, steps run plain by the guard {self.plain_steps}"
