"""The proposer's counters as Prometheus metrics, named in vLLM's style (``vllm:ouroboros_*``).

vLLM's server answers ``/metrics`` from its API-server process, while the proposer runs in the engine-core
process. prometheus_client carries metrics across processes only in its multiprocess mode, which needs
``PROMETHEUS_MULTIPROC_DIR`` set before both processes start: ``ouroboros-vllm serve`` sets it (vLLM itself
does only with ``--api-server-count`` > 1). Without it the metrics live in the engine-core process and the
server does not show them; the periodic log line has the same figures.

Counters carry totals since the engine started; the gauges give the ratios over the same span (and the pool's
size now), so a dashboard works without PromQL, e.g. ``vllm:ouroboros_mean_acceptance_length``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

from prometheus_client import REGISTRY, Counter, Gauge

from ouroboros_vllm.algorithm.adaptive import AdaptiveController
from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.stats import DraftStats

_LABELS = ["model_name"]

# DraftStats field -> its counter (prometheus_client adds "_total" to each name when it exposes it).
_STATS_COUNTERS: dict[str, tuple[str, str]] = {
    "steps": ("vllm:ouroboros_draft_steps", "Engine steps that drafted for at least one request."),
    "rounds": ("vllm:ouroboros_draft_rounds", "Proposals made (one per request per engine step)."),
    "proposed_tokens": ("vllm:ouroboros_proposed_tokens", "Tokens proposed to the target."),
    "suffix_tokens": ("vllm:ouroboros_suffix_tokens", "Proposed tokens that came from pool phrases."),
    "verified_rounds": ("vllm:ouroboros_verified_rounds", "Proposals the target verified."),
    "verified_tokens": ("vllm:ouroboros_verified_tokens", "Proposed tokens the target verified."),
    "accepted_tokens": ("vllm:ouroboros_accepted_tokens", "Proposed tokens the target accepted."),
    "suffix_accepted_tokens": ("vllm:ouroboros_suffix_accepted_tokens", "Accepted tokens from pool phrases."),
    "matched_suffix_tokens": (
        "vllm:ouroboros_matched_suffix_tokens",
        "Proposed tokens from pool phrases that matched more context than their key.",
    ),
    "matched_suffix_accepted_tokens": (
        "vllm:ouroboros_matched_suffix_accepted_tokens",
        "Accepted tokens from pool phrases that matched more context than their key.",
    ),
    "first_path_key_only_tokens": (
        "vllm:ouroboros_first_path_key_only_tokens",
        "Proposed tokens on the first path from pool phrases that matched only their key.",
    ),
    "first_path_key_only_accepted_tokens": (
        "vllm:ouroboros_first_path_key_only_accepted_tokens",
        "Accepted tokens on the first path from pool phrases that matched only their key.",
    ),
    "tree_rounds": ("vllm:ouroboros_tree_rounds", "Proposals verified as trees with alternative branches."),
    "tree_choice_rounds": (
        "vllm:ouroboros_tree_choice_rounds",
        "Proposals that could be trees (verification 'tree', or 'auto' at a batch size where trees pay).",
    ),
    "branch_tokens": ("vllm:ouroboros_branch_tokens", "Tokens on alternative branches of verified trees."),
    "branch_rounds": ("vllm:ouroboros_branch_rounds", "Verified trees whose accepted path took an alternative branch."),
    "branch_accepted_tokens": ("vllm:ouroboros_branch_accepted_tokens", "Accepted tokens on alternative branches."),
    "draft_forwards": ("vllm:ouroboros_draft_forwards", "Forwards of the draft model."),
    "phrase_rounds": ("vllm:ouroboros_phrase_rounds", "Proposals whose draft forwards carried pool phrases."),
    "draft_seconds": ("vllm:ouroboros_draft_seconds", "Seconds spent drafting (draft model and pool)."),
}


def stats_counter_name(field: str) -> str:
    """The name under which ``/metrics`` shows the counter of :class:`DraftStats` field ``field`` (with the
    ``_total`` that prometheus_client adds)."""
    return _STATS_COUNTERS[field][0] + "_total"


_POOL_COUNTERS: dict[str, tuple[str, str]] = {
    "lookups": ("vllm:ouroboros_pool_lookups", "Phrase pool lookups."),
    "hits": ("vllm:ouroboros_pool_hits", "Phrase pool lookups that found at least one phrase."),
    "evicted_keys": ("vllm:ouroboros_pool_evicted_keys", "Keys evicted from the pool by its caps."),
}
# Gauge name -> (help, multiprocess mode): ratios come from the live engine process, sizes add up.
_GAUGES: dict[str, tuple[str, str]] = {
    "vllm:ouroboros_mean_acceptance_length": ("Tau: tokens per verified target step.", "livemostrecent"),
    "vllm:ouroboros_acceptance_rate": ("Accepted / verified proposed tokens.", "livemostrecent"),
    "vllm:ouroboros_draft_forwards_per_round": ("Draft model forwards per proposal.", "livemostrecent"),
    "vllm:ouroboros_tokens_per_draft_forward": ("Draft-model tokens per draft forward.", "livemostrecent"),
    "vllm:ouroboros_pool_hit_rate": ("Pool lookups that found a phrase / lookups.", "livemostrecent"),
    "vllm:ouroboros_pool_phrases": ("Phrases in the shared pool.", "livesum"),
    "vllm:ouroboros_pool_keys": ("Key tokens in the shared pool.", "livesum"),
    "vllm:ouroboros_requests_tracked": ("Requests the proposer holds state for.", "livesum"),
}

# Adaptive speculation: rows by the tokens they proposed, the cost model's fit, and how well it predicts.
_LENGTHS = "vllm:ouroboros_proposed_length_rows"
# Tree verification: rounds by the rank of the pool candidate their accepted path took.
_ACCEPTED_RANK = "vllm:ouroboros_accepted_candidate_rounds"
_COST_GAUGES: dict[str, str] = {
    "vllm:ouroboros_cost_target_step_seconds": "The target's step time the planner assumes, by part (the "
    "intercept; per token computed).",
    "vllm:ouroboros_cost_draft_forward_seconds": "One draft forward's time the planner assumes, by part (the "
    "intercept; per token carried).",
    "vllm:ouroboros_cost_plain_step_seconds": "A plain step's time (nothing verified) the planner assumes at its "
    "last batch size (the intercept; per token is 0).",
}
_PREDICTION = "vllm:ouroboros_predicted_over_measured_step_time"
_CALIBRATION = "vllm:ouroboros_acceptance_calibration"
_POOL_CALIBRATION = "vllm:ouroboros_pool_acceptance_calibration"
_TIME_CALIBRATION = "vllm:ouroboros_step_time_calibration"
_GUARD = "vllm:ouroboros_guard_plain_steps"

_metrics: dict[str, Counter | Gauge] = {}
# The metrics labelled by model name only.
_UNLABELLED = [
    *(name for name, _ in _STATS_COUNTERS.values()),
    *(name for name, _ in _POOL_COUNTERS.values()),
    *_GAUGES,
    _PREDICTION,
    _CALIBRATION,
    _POOL_CALIBRATION,
    _TIME_CALIBRATION,
    _GUARD,
]


def registered() -> dict[str, Counter | Gauge]:
    """The process's metric objects, made once (prometheus_client refuses a second metric of one name).

    A new in-process vLLM engine unregisters every ``vllm:`` collector from the default registry before it
    registers its own; we register ours again (a no-op when they are still there) for each new proposer.
    """
    if not _metrics:
        for name, text in (*_STATS_COUNTERS.values(), *_POOL_COUNTERS.values()):
            _metrics[name] = Counter(name, text, labelnames=_LABELS)
        for name, (text, mode) in _GAUGES.items():
            _metrics[name] = Gauge(name, text, labelnames=_LABELS, multiprocess_mode=mode)
        _metrics[_LENGTHS] = Counter(_LENGTHS, "Rows by the tokens they proposed (adaptive).", [*_LABELS, "length"])
        _metrics[_ACCEPTED_RANK] = Counter(
            _ACCEPTED_RANK, "Rounds whose accepted path took the pool candidate of this rank (0: the first path's).",
            [*_LABELS, "rank"],
        )  # fmt: skip
        for name, text in _COST_GAUGES.items():
            _metrics[name] = Gauge(name, text, [*_LABELS, "part"], multiprocess_mode="livemostrecent")
        _metrics[_PREDICTION] = Gauge(
            _PREDICTION,
            "Predicted / measured step time, drafting included (adaptive).",
            _LABELS,
            multiprocess_mode="livemostrecent",
        )
        for name, text in (
            (
                _CALIBRATION,
                "Accepted draft-model tokens / what the acceptance model expected, lately: the planner's scale.",
            ),
            (
                _POOL_CALIBRATION,
                "Accepted pool tokens / what the acceptance model expected, lately: the planner's scale.",
            ),
            (_TIME_CALIBRATION, "A speculative step's time / what the cost model predicted, lately: its scale."),
        ):
            _metrics[name] = Gauge(name, text, _LABELS, multiprocess_mode="livemostrecent")
        _metrics[_GUARD] = Counter(
            _GUARD, "Steps the planner's speculation was set aside: measured slower than plain steps there.", _LABELS
        )
    for metric in _metrics.values():
        with contextlib.suppress(ValueError):  # already registered
            REGISTRY.register(metric)
    return _metrics


# Seconds between two pushes from engine steps (:meth:`MetricsExporter.due`): a GPU step takes a few ms and a scrape
# comes every few seconds, so a push per step would be pure overhead. A finished request pushes at once.
PUSH_INTERVAL_S = 0.1


class MetricsExporter:
    """Pushes one proposer's counters to the process's Prometheus metrics, as increments since the last push."""

    def __init__(self, model_name: str) -> None:
        # The labelled series, looked up once: push() runs at every engine step.
        metrics = registered()
        self._model_name = model_name
        self._series = {name: metrics[name].labels(model_name=model_name) for name in _UNLABELLED}
        self._costs = {
            (name, part): metrics[name].labels(model_name=model_name, part=part)
            for name in _COST_GAUGES
            for part in ("intercept", "per_token")
        }
        self._labelled: dict[tuple[str, int], Counter] = {}  # a histogram's series per bucket, made when first seen
        self._pushed = DraftStats()
        self._pushed_pool = {name: 0 for name in _POOL_COUNTERS}
        self._pushed_lengths: dict[int, int] = {}
        self._pushed_guard = 0
        self._pushed_at = float("-inf")  # time.perf_counter() of the last push

    def due(self) -> bool:
        """Whether an engine step should push: :data:`PUSH_INTERVAL_S` has passed since the last push."""
        return time.perf_counter() - self._pushed_at >= PUSH_INTERVAL_S

    def push(self, stats: DraftStats, pool: PhrasePool | None, tracked_requests: int) -> None:
        self._pushed_at = time.perf_counter()
        for name, (counter, _) in _STATS_COUNTERS.items():
            self._add(counter, getattr(stats, name), getattr(self._pushed, name))
        for rank, rounds in stats.accepted_rank.items():
            self._inc_labelled(_ACCEPTED_RANK, "rank", rank, rounds - self._pushed.accepted_rank.get(rank, 0))
        self._pushed = replace(stats, accepted_rank=dict(stats.accepted_rank))
        self._series["vllm:ouroboros_mean_acceptance_length"].set(stats.tau)
        self._series["vllm:ouroboros_acceptance_rate"].set(stats.acceptance_rate)
        self._series["vllm:ouroboros_draft_forwards_per_round"].set(stats.draft_forwards_per_round)
        self._series["vllm:ouroboros_tokens_per_draft_forward"].set(stats.tokens_per_draft_forward)
        self._series["vllm:ouroboros_requests_tracked"].set(tracked_requests)
        if pool is None:
            return
        for name, (metric, _) in _POOL_COUNTERS.items():
            total = getattr(pool.counters, name)
            self._add(metric, total, self._pushed_pool[name])
            self._pushed_pool[name] = total
        self._series["vllm:ouroboros_pool_hit_rate"].set(pool.counters.hit_rate)
        self._series["vllm:ouroboros_pool_phrases"].set(len(pool))
        self._series["vllm:ouroboros_pool_keys"].set(pool.num_keys)

    def _inc_labelled(self, name: str, label: str, bucket: int, increment: int) -> None:
        if increment > 0:
            if (name, bucket) not in self._labelled:
                labels = {"model_name": self._model_name, label: str(bucket)}
                self._labelled[(name, bucket)] = registered()[name].labels(**labels)
            self._labelled[(name, bucket)].inc(increment)

    def push_adaptive(self, controller: AdaptiveController) -> None:
        stats = controller.stats
        for length, rows in stats.lengths.items():
            self._inc_labelled(_LENGTHS, "length", length, rows - self._pushed_lengths.get(length, 0))
            self._pushed_lengths[length] = rows
        self._add(_GUARD, stats.guard_plain_steps, self._pushed_guard)
        self._pushed_guard = stats.guard_plain_steps
        for name, fit in (
            ("vllm:ouroboros_cost_target_step_seconds", controller.target_fit()),
            ("vllm:ouroboros_cost_draft_forward_seconds", controller.costs.draft.fit),
            ("vllm:ouroboros_cost_plain_step_seconds", controller.plain_cost()),
        ):
            if fit is not None:
                self._costs[(name, "intercept")].set(fit.intercept)
                self._costs[(name, "per_token")].set(fit.slope)
        if stats.measured_seconds:
            self._series[_PREDICTION].set(stats.predicted_seconds / stats.measured_seconds)
        self._series[_CALIBRATION].set(controller.acceptance_scale())
        self._series[_POOL_CALIBRATION].set(controller.pool_scale())
        self._series[_TIME_CALIBRATION].set(controller.time_scale())

    def _add(self, counter: str, total: float, pushed: float) -> None:
        """Count what happened since the last push (counters only go up)."""
        if total > pushed:
            self._series[counter].inc(total - pushed)
