"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers), sometimes more
than once in the same process. It checks the installed vLLM against the supported range (a clear error at
start-up beats a confusing one mid-generation) and installs the runner hooks; both steps are idempotent.
"""

from __future__ import annotations

import logging

from ouroboros_vllm import vllm_hooks

logger = logging.getLogger(__name__)


def register() -> None:
    """Entry point of the ``ouroboros`` general plugin."""
    version = vllm_hooks.check_vllm_version()
    if vllm_hooks.is_installed():
        return
    vllm_hooks.install()
    logger.debug("ouroboros-vllm: runner hooks installed for vLLM %s", version)
