"""OuroborosConfig: every bad setting is refused with one message naming the key and what it accepts."""

import pytest

from ouroboros_vllm.config import OuroborosConfig, OuroborosConfigError


def parse(section):
    return OuroborosConfig.from_additional_config({"ouroboros": section})


def test_defaults_are_documented_values():
    config = parse({"draft_model": "/models/draft"})
    assert config.draft_model == "/models/draft"
    assert config.drafting == "greedy"
    assert config.draft_dtype == "auto"
    assert config.stats_log_interval_s == 30.0


def test_config_is_frozen():
    config = parse({"draft_model": "/models/draft"})
    with pytest.raises(Exception):
        config.drafting = "greedy"


def test_other_sections_of_additional_config_are_ignored():
    config = OuroborosConfig.from_additional_config({"ouroboros": {"draft_model": "d"}, "other_plugin": {"x": 1}})
    assert config.draft_model == "d"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"draft_model": "d", "gama": 3},
         'additional_config["ouroboros"]["gama"]: unknown key; the known keys are draft_model, drafting, '
         "draft_dtype, stats_log_interval_s"),
        ({"draft_model": 7}, 'additional_config["ouroboros"]["draft_model"] must be a string (got 7)'),
        ({"draft_model": "d", "drafting": "fast"},
         "additional_config[\"ouroboros\"][\"drafting\"] must be one of 'greedy' (got 'fast')"),
        ({"draft_model": "d", "draft_dtype": "fp8"},
         "additional_config[\"ouroboros\"][\"draft_dtype\"] must be one of 'auto', 'float32', 'bfloat16', "
         "'float16' (got 'fp8')"),
        ({"draft_model": "d", "stats_log_interval_s": -1},
         'additional_config["ouroboros"]["stats_log_interval_s"] must be a number >= 0.0 (got -1)'),
        ({"draft_model": "d", "stats_log_interval_s": "10"},
         "additional_config[\"ouroboros\"][\"stats_log_interval_s\"] must be a number >= 0.0 (got '10')"),
        ({}, 'additional_config["ouroboros"]["draft_model"] is required for drafting=\'greedy\''),
    ],
)
def test_bad_settings_name_the_key_and_allowed_values(section, message):
    with pytest.raises(OuroborosConfigError) as error:
        parse(section)
    assert str(error.value).startswith(message)


def test_section_must_be_an_object():
    with pytest.raises(OuroborosConfigError, match=r'additional_config\["ouroboros"\] must be a JSON object'):
        OuroborosConfig.from_additional_config({"ouroboros": ["draft"]})
