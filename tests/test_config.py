"""OuroborosConfig: every bad setting is refused with one message naming the key and what it accepts."""

import os

import pydantic
import pytest

from ouroboros_vllm.vllm_plugin.config import OuroborosConfig, OuroborosConfigError


def parse(section):
    return OuroborosConfig.from_additional_config({"ouroboros": section})


def test_defaults_are_documented_values():
    config = parse({"draft_model": "/models/draft"})
    assert config.draft_model == "/models/draft"
    assert config.drafting == "auto" and config.adaptive
    assert config.gamma_for(8) == 8  # auto: the planner may draft up to K
    assert config.draft_dtype == "auto"
    assert config.stats_log_interval_s == 30.0


def test_config_is_frozen():
    config = parse({"draft_model": "/models/draft"})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.drafting = "greedy"


def test_other_sections_of_additional_config_are_ignored():
    config = OuroborosConfig.from_additional_config({"ouroboros": {"draft_model": "d"}, "other_plugin": {"x": 1}})
    assert config.draft_model == "d"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"draft_model": "d", "gama": 3},
            'additional_config["ouroboros"]["gama"]: unknown key; the known keys are draft_model, drafting, '
            "adaptive, gamma, ngram_size, max_phrases_per_key, draft_phrases, lookahead_window, num_candidates, "
            "verification, pool_max_keys, pool_memory_mib, warm_start, pool_path, pool_save_interval_s, "
            "context_ngrams, batch_draft, draft_dtype, draft_forward, stats_log_interval_s",
        ),
        ({"draft_model": 7}, 'additional_config["ouroboros"]["draft_model"] must be a string (got 7)'),
        (
            {"draft_model": "d", "drafting": "fast"},
            'additional_config["ouroboros"]["drafting"] must be one of '
            "'auto', 'greedy', 'greedy_pool', 'ouroboros', 'pool_only' (got 'fast')",
        ),
        (
            {"draft_model": "d", "ngram_size": 1},
            'additional_config["ouroboros"]["ngram_size"] must be an integer >= 2 and <= 16 (got 1)',
        ),
        ({"draft_model": "d", "gamma": 0}, 'additional_config["ouroboros"]["gamma"] must be an integer >= 1 (got 0)'),
        (
            {"draft_model": "d", "gamma": 2.0},
            'additional_config["ouroboros"]["gamma"] must be an integer >= 1 (got 2.0)',
        ),
        (
            {"draft_model": "d", "max_phrases_per_key": 0},
            'additional_config["ouroboros"]["max_phrases_per_key"] must be an integer >= 1 and <= 1024 (got 0)',
        ),
        (
            {"draft_model": "d", "context_ngrams": "yes"},
            'additional_config["ouroboros"]["context_ngrams"] must be true or false (got \'yes\')',
        ),
        (
            {"draft_model": "d", "draft_dtype": "fp8"},
            "additional_config[\"ouroboros\"][\"draft_dtype\"] must be one of 'auto', 'float32', 'bfloat16', "
            "'float16', 'int8' (got 'fp8')",
        ),
        (
            {"draft_model": "d", "draft_forward": "graphs"},
            "additional_config[\"ouroboros\"][\"draft_forward\"] must be one of 'auto', 'packed', 'static' (got "
            "'graphs')",
        ),
        (
            {"draft_model": "d", "stats_log_interval_s": -1},
            'additional_config["ouroboros"]["stats_log_interval_s"] must be a number >= 0.0 (got -1)',
        ),
        (
            {"draft_model": "d", "stats_log_interval_s": "10"},
            'additional_config["ouroboros"]["stats_log_interval_s"] must be a number >= 0.0 (got \'10\')',
        ),
        (
            {"draft_model": "d", "lookahead_window": -1},
            'additional_config["ouroboros"]["lookahead_window"] must be an integer >= 0 and <= 64 (got -1)',
        ),
        (
            {"draft_model": "d", "lookahead_window": 4, "ngram_size": 2},
            'additional_config["ouroboros"]["lookahead_window"] needs "ngram_size" >= 3 (the window has N-1 levels '
            "and needs at least 2), got ngram_size = 2",
        ),
        ({}, 'additional_config["ouroboros"]["draft_model"] is required for drafting=\'auto\''),
    ],
)
def test_bad_settings_name_the_key_and_allowed_values(section, message):
    with pytest.raises(OuroborosConfigError) as error:
        parse(section)
    assert str(error.value).startswith(message)


def test_draft_forward_auto_is_static_on_cuda_only():
    assert parse({"draft_model": "d"}).static_draft_forward("cuda")
    assert not parse({"draft_model": "d"}).static_draft_forward("cpu")
    assert parse({"draft_model": "d", "draft_forward": "static"}).static_draft_forward("cpu")
    assert not parse({"draft_model": "d", "draft_forward": "packed"}).static_draft_forward("cuda")


def test_only_the_adaptive_auto_mode_judges_whether_phrases_pay():
    assert parse({"draft_model": "d"}).judges_phrases
    assert not parse({"draft_model": "d", "adaptive": False}).judges_phrases
    assert not parse({"draft_model": "d", "drafting": "ouroboros"}).judges_phrases  # the paper's, always


def test_pool_only_needs_no_draft_model():
    assert parse({"drafting": "pool_only"}).draft_model is None
    assert not parse({"drafting": "pool_only", "draft_model": "d"}).uses_draft_model


def test_gamma_default_leaves_room_for_one_suffix():
    assert parse({"draft_model": "d", "drafting": "greedy_pool", "ngram_size": 5}).gamma_for(8) == 4
    assert parse({"draft_model": "d", "drafting": "greedy_pool", "ngram_size": 5}).gamma_for(16) == 12
    assert parse({"draft_model": "d", "drafting": "greedy_pool", "ngram_size": 5}).gamma_for(4) == 2
    assert parse({"draft_model": "d", "drafting": "greedy_pool", "ngram_size": 5}).gamma_for(1) == 1
    assert parse({"draft_model": "d", "drafting": "greedy_pool", "gamma": 3}).gamma_for(8) == 3


def test_plain_greedy_drafts_all_k_tokens_with_the_model():
    assert parse({"draft_model": "d", "drafting": "greedy", "gamma": 3}).gamma_for(8) == 8
    assert not parse({"draft_model": "d", "drafting": "greedy"}).uses_pool


def test_gamma_over_num_speculative_tokens_is_refused():
    with pytest.raises(
        OuroborosConfigError,
        match=r'\["gamma"\] = 9 is larger than the speculative config\'s '
        r"num_speculative_tokens = 4",
    ):
        parse({"draft_model": "d", "gamma": 9}).check_against(4)


def test_pool_path_needs_the_shared_pool():
    with pytest.raises(OuroborosConfigError, match=r'\["pool_path"\] needs "warm_start": true'):
        parse({"drafting": "pool_only", "pool_path": "/tmp/pool.bin", "warm_start": False})


def test_section_must_be_an_object():
    with pytest.raises(OuroborosConfigError, match=r'additional_config\["ouroboros"\] must be a JSON object'):
        OuroborosConfig.from_additional_config({"ouroboros": ["draft"]})


@pytest.mark.parametrize("cuda", [False, True])
def test_cpu_env_defaults_leave_the_platform_to_vllm_on_a_gpu(monkeypatch, cuda):
    import torch

    from ouroboros_vllm.tools.offline import CPU_ENV_DEFAULTS, apply_cpu_env_defaults

    for key in CPU_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    apply_cpu_env_defaults()

    assert os.environ.get("VLLM_TARGET_DEVICE") == (None if cuda else "cpu")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
