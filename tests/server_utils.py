"""The test suite's server: ``ouroboros_vllm.tools.server_process.ServerProcess`` with a completion helper."""

from __future__ import annotations

from typing import Any

import requests

from ouroboros_vllm.tools.server_process import ServerProcess, ouroboros_args

__all__ = ["Server", "ouroboros_args"]


class Server(ServerProcess):
    def complete(self, prompt: str, **body: Any) -> dict[str, Any]:
        response = requests.post(
            f"{self.url}/v1/completions", json={"model": self.model, "prompt": prompt, **body}, timeout=300
        )
        response.raise_for_status()
        return response.json()
