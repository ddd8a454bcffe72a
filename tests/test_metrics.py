"""The proposer's Prometheus metrics: increments since the last push, ratios as gauges (tests/test_server.py
reads them from a real server's /metrics)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from ouroboros_vllm.algorithm.adaptive import AdaptiveController
from ouroboros_vllm.algorithm.planner import RowOutlook
from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.stats import DraftStats
from ouroboros_vllm.vllm_plugin.metrics import MetricsExporter, registered


def sample(name: str, model: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model_name": model})


def test_counters_add_what_happened_since_the_last_push_and_gauges_hold_the_ratios():
    exporter = MetricsExporter("metrics-test")
    pool = PhrasePool(phrase_len=2, max_phrases_per_key=4, max_keys=8, max_phrases=32)
    pool.insert(1, (2, 3))
    pool.phrases(1)
    pool.phrases(9)
    stats = DraftStats(
        rounds=2,
        proposed_tokens=8,
        suffix_tokens=4,
        verified_rounds=2,
        verified_tokens=8,
        accepted_tokens=6,
        suffix_accepted_tokens=2,
        draft_forwards=3,
        draft_seconds=0.5,
    )
    exporter.push(stats, pool, 3)
    exporter.push(stats, pool, 3)  # nothing new: no double counting
    assert sample("vllm:ouroboros_accepted_tokens_total", "metrics-test") == 6
    assert sample("vllm:ouroboros_suffix_accepted_tokens_total", "metrics-test") == 2
    assert sample("vllm:ouroboros_draft_seconds_total", "metrics-test") == 0.5
    assert sample("vllm:ouroboros_pool_lookups_total", "metrics-test") == 2
    assert sample("vllm:ouroboros_pool_hits_total", "metrics-test") == 1
    assert sample("vllm:ouroboros_mean_acceptance_length", "metrics-test") == 4.0  # (6 + 2) / 2
    assert sample("vllm:ouroboros_draft_forwards_per_round", "metrics-test") == 1.5
    assert sample("vllm:ouroboros_pool_phrases", "metrics-test") == 1
    assert sample("vllm:ouroboros_requests_tracked", "metrics-test") == 3
    stats.add(DraftStats(rounds=1, accepted_tokens=3, tree_rounds=1, accepted_rank={1: 1}))
    exporter.push(stats, None, 0)
    stats.add(DraftStats(accepted_rank={0: 2, 1: 1}))
    exporter.push(stats, None, 0)
    assert sample("vllm:ouroboros_accepted_tokens_total", "metrics-test") == 9
    assert sample("vllm:ouroboros_draft_rounds_total", "metrics-test") == 3
    assert sample("vllm:ouroboros_tree_rounds_total", "metrics-test") == 1
    for rank, rounds in ((0, 2), (1, 2)):
        labels = {"model_name": "metrics-test", "rank": str(rank)}
        assert REGISTRY.get_sample_value("vllm:ouroboros_accepted_candidate_rounds_total", labels) == rounds


def test_metrics_come_back_after_an_engine_unregistered_them():
    """vLLM's in-process engines drop every vllm: collector from the registry when they start."""
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    MetricsExporter("x")
    unregister_vllm_metrics()
    assert REGISTRY.get_sample_value("vllm:ouroboros_requests_tracked", {"model_name": "x"}) is None
    MetricsExporter("x").push(DraftStats(), None, 2)
    assert sample("vllm:ouroboros_requests_tracked", "x") == 2
    assert len(registered()) > 10


def test_two_exporters_in_one_process_share_the_metrics():
    MetricsExporter("a")
    MetricsExporter("b").push(DraftStats(rounds=1), None, 0)  # no "Duplicated timeseries" error
    assert sample("vllm:ouroboros_draft_rounds_total", "b") == 1


def test_the_planner_shows_its_prices_and_its_acceptance_calibration():
    exporter = MetricsExporter("planner-test")
    controller = AdaptiveController(max_tokens=4)
    controller.observe_draft([(2, 2, 0.04)] * 8, depth=8)
    for tokens in (10, 2, 10, 2):
        controller.observe_target_step(tokens, 0.2 + 0.01 * tokens, rows=2)
    controller.plan([RowOutlook(4, 0.9, 0.0, 0.0, can_draft=True)] * 2, 4)
    controller.observe_accepted(0)  # the target accepted nothing of what the plan expected
    exporter.push_adaptive(controller)
    plain = REGISTRY.get_sample_value(
        "vllm:ouroboros_cost_plain_step_seconds", {"model_name": "planner-test", "part": "intercept"}
    )
    assert plain == pytest.approx(0.22, abs=0.01)  # the two plain steps of 2 rows
    assert sample("vllm:ouroboros_acceptance_calibration", "planner-test") < 1.0
    assert sample("vllm:ouroboros_step_time_calibration", "planner-test") == 1.0  # no speculative step measured
    controller.stats.guard_plain_steps = 3
    exporter.push_adaptive(controller)
    exporter.push_adaptive(controller)  # increments since the last push
    assert sample("vllm:ouroboros_guard_plain_steps_total", "planner-test") == 3
