"""Shared fixtures: the test models and one long-lived vLLM engine per configuration.

vLLM's CPU engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the proposer is then an object
the tests can inspect directly. An in-process engine cannot be shut down without breaking the others, so each
engine is built once, on first use, and kept for the whole session.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ouroboros_vllm.tools.offline import apply_cpu_env_defaults

apply_cpu_env_defaults()  # before anything imports vLLM
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).parent))

import model_factory  # noqa: E402


@pytest.fixture(scope="session")
def tiny() -> model_factory.TinyModels:
    return model_factory.build_tiny_models()


class Engines:
    """One engine per name for the whole session (see the module docstring for why none is shut down)."""

    def __init__(self) -> None:
        self._engines: dict[str, Any] = {}

    def get(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._engines:
            self._engines[name] = build()
        return self._engines[name]


_ENGINES = Engines()


@pytest.fixture(scope="session")
def engines() -> Engines:
    return _ENGINES


def real_model(name: str) -> Path:
    """A model fetched by `ouroboros-vllm models fetch` (`make test` fetches them first)."""
    from ouroboros_vllm.tools import models

    if not models.is_fetched(name):
        pytest.fail(f"model {name} is not fetched: run `ouroboros-vllm models fetch {name}` (make test does)")
    return models.model_path(name)
