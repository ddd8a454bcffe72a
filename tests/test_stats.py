"""Counters and the periodic log line."""

from __future__ import annotations

import logging
from dataclasses import fields

from ouroboros_vllm.algorithm import stats as stats_module
from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.algorithm.stats import DraftStats, StatsLogger


def test_adding_counts_adds_every_field():
    counts = DraftStats(**{f.name: i + 1 for i, f in enumerate(fields(DraftStats)) if f.name != "accepted_rank"})
    counts.draft_seconds = 0.25
    counts.accepted_rank = {0: 2, 3: 1}
    total = DraftStats(accepted_rank={0: 1})
    total.add(counts)
    total.add(DraftStats())
    total.add(counts)
    for f in fields(DraftStats):
        if f.name != "accepted_rank":
            assert getattr(total, f.name) == 2 * getattr(counts, f.name), f.name
    assert total.accepted_rank == {0: 5, 3: 2}
    assert counts.accepted_rank == {0: 2, 3: 1}  # the added counts are left as they were


def test_tau_acceptance_and_tokens_per_forward():
    s = DraftStats(
        rounds=4,
        proposed_tokens=16,
        suffix_tokens=4,
        verified_rounds=4,
        verified_tokens=16,
        accepted_tokens=8,
        draft_forwards=6,
    )
    assert s.tau == (8 + 4) / 4
    assert s.acceptance_rate == 0.5
    assert s.tokens_per_draft_forward == 12 / 6
    total = DraftStats()
    total.add(s)
    total.add(s)
    assert total.accepted_tokens == 16 and total.tau == s.tau


def test_logger_logs_once_per_interval(monkeypatch, caplog):
    clock = [100.0]
    monkeypatch.setattr(stats_module.time, "monotonic", lambda: clock[0])
    log = StatsLogger(10.0, logging.getLogger("test-stats"))
    calls = []

    def summary():
        calls.append(1)
        return "line"

    with caplog.at_level(logging.INFO, logger="test-stats"):
        log.maybe_log(summary)  # 0 s since start: nothing
        clock[0] += 10
        log.maybe_log(summary)
        clock[0] += 5
        log.maybe_log(summary)
    assert [r.getMessage() for r in caplog.records] == ["ouroboros-vllm: line"]
    assert len(calls) == 1  # the line is only built when logged


def test_pool_summary():
    pool = PhrasePool(2, 4, 10, 100)
    pool.insert(1, (2, 3))
    pool.phrases(1)
    pool.phrases(5)
    assert pool.summary() == "pool 1 phrases under 1 keys, hit rate 50.0% (1/2 lookups), 0 keys evicted"
