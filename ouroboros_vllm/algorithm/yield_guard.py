"""What speculation yielded against plain decoding, measured per batch size: the planner's safety net.

The planner's model leaves costs out (a row's catch-up, a new request's first full trunk, the probes) and its
prices can be off; what a step finally yields is measured. :class:`YieldGuard` keeps, per batch size (the rows
that may propose), decayed sums of the tokens the rows emitted and the seconds spent (the target's step and the
drafting before it) over the steps that speculated and over those that did not. Once both are known and
speculation has emitted fewer tokens a second than plain steps, the steps at that size run plain, except for a
burst of speculative steps now and then, paid out of a small share of the time run plain, which finds out
whether speculation pays again. Measured in serving at 8 concurrent requests on a 2-core CPU (a verified token
there costs half of what a plain step emits a token in): the planner's steps, with their catch-ups and trials,
ran at 0.86-0.88x plain.
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.95  # per step added to a sum: about the last 20 steps of each kind
MIN_SPECULATIVE = 6.0  # decayed speculative steps at a size before the guard may judge it (seven steps)
MIN_PLAIN = 1.5  # and plain steps (two: where the planner always proposes, they are its probes, 64 steps apart)
EXPLORE_SHARE = 0.02  # of the time run plain while speculation loses, spent on bursts that measure it again
BURST = 8  # speculative steps a burst takes: a lone step would mostly measure the rows' catch-ups


@dataclass
class Yield:
    """Decayed sums over steps of one kind at one batch size."""

    tokens: float = 0.0
    seconds: float = 0.0
    steps: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens = self.tokens * DECAY + tokens
        self.seconds = self.seconds * DECAY + seconds
        self.steps = self.steps * DECAY + 1.0

    def rate(self) -> float:
        """Tokens a second."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Size:
    plain: Yield
    speculative: Yield
    credit: float = 0.0  # seconds of exploration earned while speculation lost
    burst: int = 0  # speculative steps left in the burst under way


class YieldGuard:
    """Per batch size: whether steps may speculate, from what steps of each kind yielded."""

    def __init__(self) -> None:
        self._sizes: dict[int, _Size] = {}
        self.plain_steps = 0  # steps the guard ran plain (the planner's plan set aside)

    def _size(self, rows: int) -> _Size:
        return self._sizes.setdefault(rows, _Size(Yield(), Yield()))

    def observe(self, rows: int, speculative: bool, tokens: int, seconds: float) -> None:
        """A decoding step of ``rows`` rows emitted ``tokens`` tokens in ``seconds`` (its drafting included)."""
        if rows <= 0 or seconds <= 0:
            return
        size = self._size(rows)
        if speculative:
            size.speculative.add(tokens, seconds)
        else:
            size.plain.add(tokens, seconds)
            if self.losing(rows):
                size.credit += EXPLORE_SHARE * seconds

    def losing(self, rows: int) -> bool:
        """Whether speculation at this size has been measured to emit fewer tokens a second than plain steps."""
        size = self._sizes.get(rows)
        if size is None or size.speculative.steps < MIN_SPECULATIVE or size.plain.steps < MIN_PLAIN:
            return False
        return size.speculative.rate() < size.plain.rate()

    def allows(self, rows: int) -> bool:
        """Whether this step, of ``rows`` rows, may speculate (called once per planned step)."""
        if not self.losing(rows):
            return True
        size = self._sizes[rows]
        if size.burst == 0 and size.credit >= BURST * self._burst_step_cost(size):
            size.credit -= BURST * self._burst_step_cost(size)
            size.burst = BURST
        if size.burst > 0:
            size.burst -= 1
            return True
        self.plain_steps += 1
        return False

    @staticmethod
    def _burst_step_cost(size: _Size) -> float:
        """Seconds a speculative step costs beyond emitting its tokens at plain steps' rate, as measured."""
        spec = size.speculative
        return max(spec.seconds - spec.tokens / size.plain.rate(), 0.0) / spec.steps

    def summary(self, rows: int) -> str:
        size = self._sizes.get(rows)
        if size is None or not size.plain.steps or not size.speculative.steps:
            return ""
        return f"speculative/plain tokens per second at {rows} rows {size.speculative.rate() / size.plain.rate():.2f}"
