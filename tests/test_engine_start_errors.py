"""Each bad setting stops a real engine start with its message.

The failing starts run in a child process: an engine that failed half-way must not share a process with the
session's long-lived engines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.engine

CHILD = textwrap.dedent(
    """
    import json, sys
    from ouroboros_vllm.tools.offline import apply_cpu_env_defaults, make_llm
    apply_cpu_env_defaults()
    target, cases = sys.argv[1], json.loads(sys.argv[2])
    for settings in cases:
        try:
            make_llm(target, ouroboros=settings, kv_cache_gib=0.1)
            print(json.dumps(None), flush=True)
        except Exception as error:  # report every failure; the test checks the message
            print(json.dumps(f"{type(error).__name__}: {error}"), flush=True)
    """
)


def test_bad_settings_stop_the_engine_start_with_their_message(tiny, tmp_path):
    from ouroboros_vllm.algorithm.pool import PhrasePool
    from ouroboros_vllm.algorithm.pool_file import PoolIdentity, save_pool, tokenizer_fingerprint

    foreign = tmp_path / "foreign-pool.bin"
    pool = PhrasePool(4, 2, 2, 2)
    pool.insert(1, (2, 3, 4, 5))
    save_pool(pool, foreign, PoolIdentity(tokenizer_fingerprint({"x": 0}), "other-target"))
    corrupt = tmp_path / "corrupt-pool.bin"
    corrupt.write_bytes(foreign.read_bytes()[:-1] + b"?")
    cases = {
        "pool of another tokenizer": (
            {"drafting": "pool_only", "pool_path": str(foreign)},
            f"pool file {str(foreign)!r} was made with another tokenizer",
        ),
        "corrupt pool": (
            {"drafting": "pool_only", "pool_path": str(corrupt)},
            f"pool file {str(corrupt)!r} is corrupt",
        ),
        "unreadable pool_path": (
            {"drafting": "pool_only", "pool_path": str(tmp_path)},
            f"pool_path {str(tmp_path)!r} is not a readable and writable file",
        ),
        "unknown key": (
            {"draft_model": str(tiny.draft), "gama": 12},
            'additional_config["ouroboros"]["gama"]: unknown key; the known keys are draft_model, ',
        ),
        "wrong type": (
            {"draft_model": str(tiny.draft), "stats_log_interval_s": "often"},
            'additional_config["ouroboros"]["stats_log_interval_s"] must be a number >= 0.0 (got \'often\')',
        ),
        "out of range": (
            {"draft_model": str(tiny.draft), "stats_log_interval_s": -5},
            'additional_config["ouroboros"]["stats_log_interval_s"] must be a number >= 0.0 (got -5)',
        ),
        "bad choice": (
            {"draft_model": str(tiny.draft), "drafting": "beam"},
            "additional_config[\"ouroboros\"][\"drafting\"] must be one of 'auto', 'greedy', 'greedy_pool', "
            "'ouroboros', 'pool_only' "
            "(got 'beam')",
        ),
        "gamma over K": (
            {"draft_model": str(tiny.draft), "gamma": 9},
            'additional_config["ouroboros"]["gamma"] = 9 is larger than the speculative config\'s '
            "num_speculative_tokens = 4",
        ),
        "N < 2": (
            {"draft_model": str(tiny.draft), "ngram_size": 1},
            'additional_config["ouroboros"]["ngram_size"] must be an integer >= 2 and <= 16 (got 1)',
        ),
        "no draft": ({}, 'additional_config["ouroboros"]["draft_model"] is required'),
        "missing draft path": (
            {"draft_model": "/nonexistent/draft-model"},
            'additional_config["ouroboros"]["draft_model"]: no model folder at \'/nonexistent/draft-model\'',
        ),
        "other tokenizer": (
            {"draft_model": str(tiny.draft_other_vocab)},
            f"DraftModelError: draft model {str(tiny.draft_other_vocab)!r} has another tokenizer "
            f"than the target {str(tiny.target)!r}: 1280 and 1536 tokens",
        ),
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny.target), json.dumps([settings for settings, _ in cases.values()])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith(('"', "null"))]
    assert len(lines) == len(cases), result.stdout + result.stderr[-3000:]
    for (name, (_, message)), reported in zip(cases.items(), lines, strict=True):
        assert reported is not None, f"{name}: the engine started"
        assert message in reported, f"{name}: {reported}"
