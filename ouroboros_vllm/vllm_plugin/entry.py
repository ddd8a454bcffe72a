"""The ``vllm.general_plugins`` entry point (``ouroboros``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers), sometimes more
than once in the same process, and for every user of the environment, including those who never select our
proposer. So it must never break vLLM: on a vLLM outside the supported range it logs one warning and installs
nothing; the error comes when ``OuroborosProposer`` is selected (its constructor checks the version again and
raises). On a supported vLLM it installs the runner hooks, which are a pass-through for any other proposer.
"""

from __future__ import annotations

import logging

from ouroboros_vllm.vllm_plugin import hooks

logger = logging.getLogger(__name__)


def register() -> None:
    """Entry point of the ``ouroboros`` general plugin (idempotent)."""
    try:
        version = hooks.check_vllm_version()
    except hooks.UnsupportedVllmError as error:
        if not getattr(register, "_warned", False):
            register._warned = True  # type: ignore[attr-defined]
            logger.warning("ouroboros-vllm: not installing the runner hooks: %s", error)
        return
    if hooks.is_installed():
        return
    hooks.install()
    logger.debug("ouroboros-vllm: runner hooks installed for vLLM %s", version)
