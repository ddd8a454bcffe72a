"""What a step costs, learned from the engine's own steps: no constant is tuned to a machine.

Three linear models, fitted online on the recent past:

- the target's step: seconds as a function of the tokens it computes (every row's last token and its draft
  tokens), ``a + b * tokens``, over every step and per batch size;
- a plain step (one token a row, nothing verified): seconds by rows. Priced apart because a step that verifies
  proposals pays a fixed extra (vLLM's rejection sampling) and because a CPU's step cost bends upwards once the
  tokens outnumber what reading the weights hides, so a line through speculative steps misprices a plain one;
- one forward of the draft model: seconds as a function of the tokens it carries, ``c + d * tokens``.

Each keeps a short window of recent samples (the machine's speed changes when a neighbour arrives) and refits
by least squares with a weak ridge prior (so that a model that
has only seen one size of step still answers, and answers sensibly: as if each token cost a small share of a
step), dropping samples far from the others of their size (a step slowed by a preemption). On a
CPU a step costs more per token than on a GPU, where it is nearly flat until the batch is large; both are the
same two numbers to this model.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# The prior's slope, as a fraction of the intercept per token: weak (it counts as a fraction of a sample), and only
# there until the steps seen so far differ enough in size to show the real slope.
PRIOR_SLOPE_FRACTION = 1 / 64
PRIOR_WEIGHT = 0.25
# A sample over this many median absolute deviations (at least OUTLIER_FLOOR of the median) from the others of its
# size, or, for a size seen once or twice, over OUTLIER_RATIO times off the first fit, is left out of the refit.
OUTLIER_MADS = 5.0
OUTLIER_FLOOR = 0.05
OUTLIER_RATIO = 3.0


def is_plain_step(rows: int, tokens: int) -> bool:
    """Whether a target step of ``rows`` rows that computed ``tokens`` tokens verified nothing (one token a row)."""
    return tokens == rows


def _all_plain(rows: int, samples: Iterable[tuple[float, float]]) -> bool:
    """Whether every (tokens, seconds) step of ``rows`` rows in ``samples`` verified nothing."""
    return all(is_plain_step(rows, tokens) for tokens, _ in samples)


@dataclass(frozen=True)
class LinearCost:
    """``intercept + slope * tokens`` seconds."""

    intercept: float
    slope: float

    def __call__(self, tokens: float) -> float:
        return self.intercept + self.slope * tokens

    def scaled(self, factor: float) -> LinearCost:
        return LinearCost(self.intercept * factor, self.slope * factor)


class Calibration:
    """What was measured over what a model predicted, lately: sums that decay by ``decay`` at each :meth:`age`
    (each planned step), starting from 1 with the weight of ``prior`` predicted units, within ``bounds``.
    Predictions are recorded uncalibrated (divided by the scale they were made with), so the scale converges to
    the model's own bias rather than chasing itself. Ageing by steps, not by evidence, lets a scale that stopped
    the plans from proposing (and so from being measured) drift back to 1 and be tried again."""

    def __init__(self, prior: float, decay: float, bounds: tuple[float, float]) -> None:
        self.prior, self.decay, self.bounds = prior, decay, bounds
        self.measured = self.predicted = 0.0

    def add(self, measured: float, predicted: float) -> None:
        self.measured += measured
        self.predicted += predicted

    def age(self) -> None:
        self.measured *= self.decay
        self.predicted *= self.decay

    def scale(self) -> float:
        low, high = self.bounds
        return min(max((self.measured + self.prior) / (self.predicted + self.prior), low), high)


class OnlineLinearFit:
    """Seconds against tokens over the last ``window`` samples, refitted after each of the first ``refit_every``
    samples, then every ``refit_every`` samples. The refit waits until the fit is read: a step adds to several
    fits (every size's, the plain steps') and the plan reads one or two."""

    def __init__(self, window: int = 128, refit_every: int = 4) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)
        self._refit_every = refit_every
        self._since_fit = 0
        self._fit: LinearCost | None = None
        self._spread: float | None = None  # of the window's sizes; None: to compute (read every step, rarely new)

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, tokens: float, seconds: float) -> None:
        if seconds <= 0 or tokens < 0:
            return
        self._samples.append((float(tokens), float(seconds)))
        self._since_fit += 1
        self._spread = None

    @property
    def samples(self) -> list[tuple[float, float]]:
        """The window's (tokens, seconds) samples, oldest first."""
        return list(self._samples)

    @property
    def spread(self) -> float:
        """How far apart the sizes (tokens) of the window's samples are."""
        if self._spread is None:
            self._spread = spread(self._samples)
        return self._spread

    @property
    def fit(self) -> LinearCost | None:
        """The current fit; None before the first sample."""
        # Every sample while there are few (each one news), then every refit_every.
        if self._since_fit and (len(self._samples) <= self._refit_every or self._since_fit >= self._refit_every):
            self._fit = self._refit()
            self._since_fit = 0
        return self._fit

    def _refit(self) -> LinearCost:
        data = np.asarray(self._samples)
        x, y = data[:, 0], data[:, 1]
        fit = _ridge(x, y)
        keep = _inliers(x, y, fit)
        return fit if keep.all() or keep.sum() < 2 else _ridge(x[keep], y[keep])


def _inliers(x: np.ndarray, y: np.ndarray, fit: LinearCost) -> np.ndarray:
    """The samples to fit: a step slowed by a preemption or a neighbour is far from the others of its size.

    Outliers are judged among samples of the same size where there are a few, not by their distance from the
    first fit: the rare step of another size is what shows the slope, and a fit made mostly of one size would
    call it an outlier. A size seen once or twice is only dropped when it is far off the first fit.
    """
    sizes, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    median = _group_medians(group, y, counts)
    deviation = np.abs(y - median[group])
    spread = np.maximum(_group_medians(group, deviation, counts), OUTLIER_FLOOR * median)
    expected = np.maximum(fit.intercept + fit.slope * sizes, 1e-12)
    among_own = deviation <= OUTLIER_MADS * spread[group]
    near_fit = (y <= OUTLIER_RATIO * expected[group]) & (y >= expected[group] / OUTLIER_RATIO)
    return np.where(counts[group] >= 3, among_own, near_fit)


def _group_medians(group: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The median of ``values`` within each group (``group``: each value's group index, ``counts``: group sizes),
    as ``np.median`` computes it (the mean of the two middle values of an even count), in a few array calls: the
    refit runs after every few steps, and a per-size loop cost more than the rest of a step's planning."""
    ordered = values[np.lexsort((values, group))]  # by group, then by value
    starts = np.cumsum(counts) - counts
    return (ordered[starts + (counts - 1) // 2] + ordered[starts + counts // 2]) / 2


def _ridge(x: np.ndarray, y: np.ndarray) -> LinearCost:
    """Least squares of ``y ≈ a + b x`` with a weak prior ``b ≈ a * PRIOR_SLOPE_FRACTION``; both >= 0.

    The 2x2 normal equations are solved in closed form (a refit follows every few steps: a general solver's
    overhead cost more than the fit)."""
    intercept0 = float(np.median(y / (1 + PRIOR_SLOPE_FRACTION * x)))
    n, sum_x, sum_xx, sum_y, sum_xy = len(x), float(x.sum()), float(x @ x), float(y.sum()), float(x @ y)
    # The prior's weight on each term, scaled to keep it comparable for both.
    weight_a, weight_b = PRIOR_WEIGHT, PRIOR_WEIGHT * max(sum_x / n, 1.0) ** 2
    prior_a, prior_b = intercept0, intercept0 * PRIOR_SLOPE_FRACTION
    # [[n + wa, sx], [sx, sxx + wb]] @ [a, b] = [sy + wa pa, sxy + wb pb]; the determinant is > 0 (Cauchy-Schwarz).
    g11, g12, g22 = n + weight_a, sum_x, sum_xx + weight_b
    r1, r2 = sum_y + weight_a * prior_a, sum_xy + weight_b * prior_b
    determinant = g11 * g22 - g12 * g12
    intercept, slope = (r1 * g22 - g12 * r2) / determinant, (g11 * r2 - g12 * r1) / determinant
    if slope < 0:  # the best line with a flat slope, not the tilted line's intercept (too high by the tilt)
        return LinearCost(max((sum_y + weight_a * intercept0) / (n + weight_a), 0.0), 0.0)
    if intercept < 0:  # the best line through the origin
        slope = (sum_xy + weight_b * prior_b) / (sum_xx + weight_b)
    return LinearCost(max(intercept, 0.0), max(slope, 0.0))


class CostModel:
    """The target's step and the draft's forward, learned from the engine's steps.

    The target's step is also fitted per batch size (rows): what a planner needs is the price of one more
    verified token at the step's own number of rows, and a fit across batch sizes mixes that with the price of a
    row (when requests finish, the steps get smaller in rows and in tokens together). The per-size fit is used
    once its steps differ enough in tokens to show the slope; until then, the fit over every size.
    """

    def __init__(self, min_spread: int = 2) -> None:
        # Short windows: a neighbour that starts competing for the cores must show in the plan within seconds.
        # A step gives one target sample and a few draft samples.
        self.target = OnlineLinearFit(window=64)
        self.draft = OnlineLinearFit(window=128)
        self.target_by_rows: dict[int, OnlineLinearFit] = {}
        # Steps that verified nothing (one token a row), every batch size: what proposing nothing costs.
        self.plain = OnlineLinearFit(window=32, refit_every=1)  # few samples, each one news
        self.min_spread = min_spread  # tokens between a batch size's smallest and largest steps to show a slope

    def add_target_step(self, rows: int, tokens: int, seconds: float) -> None:
        self.target.add(tokens, seconds)
        if rows not in self.target_by_rows:
            self.target_by_rows[rows] = OnlineLinearFit(window=32)
        self.target_by_rows[rows].add(tokens, seconds)
        if is_plain_step(rows, tokens):
            self.plain.add(tokens, seconds)

    def plain_cost(self, rows: int) -> LinearCost | None:
        """A plain step's time at ``rows`` rows (flat: the rows are the tokens): the median of that batch size's
        recent plain steps; without one, the fit over every size once two plain steps were measured; else None.
        Per size first, because a CPU's plain step is not even monotonic in rows (one row: a matrix-vector path
        measured at 260-290 ms, slower than six rows' 170-220 ms)."""
        measured = self.plain_at(rows)
        if measured is not None:
            return LinearCost(measured, 0.0)
        fit = self.plain.fit if len(self.plain) >= 2 else None
        return None if fit is None else LinearCost(fit(rows), 0.0)

    def plain_at(self, rows: int) -> float | None:
        """The median of this batch size's recent plain steps, if it had one (no extrapolation from other sizes)."""
        at_size = self.target_by_rows.get(rows)
        samples = at_size.samples if at_size is not None else []
        plain = [seconds for tokens, seconds in samples if is_plain_step(rows, tokens)]
        return statistics.median(plain) if plain else None  # as np.median, without its fixed cost

    def target_fit(self, rows: int) -> LinearCost | None:
        """The target's step time at ``rows`` rows, by tokens: the fit at that batch size once it shows a slope.

        Before that, the fit of the nearest batch size that shows one, its price of a token scaled up by the rows
        when this size is larger (a token cost 3.7 ms at 1 row and ~13 ms at 8 on this project's CPU: a larger
        batch priced at a smaller one's price drafts, and catches the draft up on every new prompt, where it
        cannot pay); while no size shows a slope, the fit over every size, scaled up the same way from the
        largest size where a step verified drafts (a server's first eight requests, priced at its one warm-up
        request's 6 ms a token where a token cost 29 ms, drafted full trunks for all of them and caught up their
        prompts: one step of 4.7 s for 28 tokens, where plain decoding takes 1.6 s)."""
        if self._shows_slope(rows):
            return self.target_by_rows[rows].fit
        known = [size for size in self.target_by_rows if self._shows_slope(size)]
        if not known:
            verified = [size for size, fit in self.target_by_rows.items() if not _all_plain(size, fit.samples)]
            return _scaled_up(self.target.fit, max(verified, default=rows), rows)
        nearest = min(known, key=lambda size: (abs(size - rows), -size))
        return _scaled_up(self.target_by_rows[nearest].fit, nearest, rows)

    def _shows_slope(self, rows: int) -> bool:
        at_size = self.target_by_rows.get(rows)
        return at_size is not None and len(at_size) >= 8 and at_size.spread >= self.min_spread

    @property
    def ready(self) -> bool:
        """Whether both have been measured at least once (before that the planner proposes what it is told)."""
        return self.target.fit is not None and self.draft.fit is not None

    def summary(self) -> str:
        parts = []
        for name, model in (("target step", self.target), ("plain step", self.plain), ("draft forward", self.draft)):
            fit = model.fit
            if fit is not None:
                parts.append(f"{name} {1000 * fit.intercept:.1f} + {1000 * fit.slope:.2f}/token ms")
        return ", ".join(parts) if parts else "not measured yet"


def _scaled_up(fit: LinearCost | None, measured_rows: int, rows: int) -> LinearCost | None:
    """``fit``, measured at ``measured_rows`` rows, as a price at ``rows``: its price of a token scaled up by the rows
    when ``rows`` is larger (an upper bound: a larger batch's token costs more, though less than in proportion),
    as is otherwise (and when the rows were not known)."""
    if fit is None or not 0 < measured_rows < rows:
        return fit
    return LinearCost(fit.intercept, fit.slope * rows / measured_rows)


def spread(samples: Iterable[tuple[float, float]]) -> float:
    """How far apart the sizes (tokens) of these samples are."""
    sizes = [tokens for tokens, _ in samples]
    return max(sizes) - min(sizes) if sizes else 0.0
