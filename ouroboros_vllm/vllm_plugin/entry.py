"""The ``vllm.general_plugins`` entry point (``ouroboros``).

vLLM calls :func:`register` in every process it starts (API server, engine core, workers), sometimes more
than once in the same process, and for every user of the environment, including those who never select our
proposer. So it must never break vLLM: on a vLLM outside the supported range it logs one warning and installs
nothing; the error comes when ``OuroborosProposer`` is selected (its constructor checks the version again and
raises). On a supported vLLM it installs the runner hooks, which are a pass-through for any other proposer.

vLLM gives a handler to its own ``vllm`` logger only, so our ``ouroboros_vllm`` loggers' INFO lines (the proposer's
stats line, the draft's loading) went nowhere in ``vllm serve`` and ``LLM()``: :func:`route_logs` hands them to
vLLM's logger, unless the application configured logging itself.
"""

from __future__ import annotations

import logging
import os

from ouroboros_vllm.vllm_plugin import hooks

logger = logging.getLogger(__name__)


def register() -> None:
    """Entry point of the ``ouroboros`` general plugin (idempotent)."""
    route_logs()
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


class _ThroughVllm(logging.Handler):
    """Hands our records to vLLM's logger, so that they go wherever vLLM's go, under its config at the time of
    each record (vLLM configures its logging at process start, before or after the plugin is registered)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)


def route_logs() -> None:
    """Our loggers write through vLLM's (idempotent). Left alone when the root logger has handlers (the
    application configured logging, which then applies to us by propagation) or ours already has one."""
    ours = logging.getLogger("ouroboros_vllm")
    if ours.handlers or logging.getLogger().handlers:
        return
    ours.addHandler(_ThroughVllm())
    # vLLM's handler filters by vLLM's level; ours only keeps DEBUG records from being made when not wanted.
    ours.setLevel(logging.DEBUG if os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() == "DEBUG" else logging.INFO)
    ours.propagate = False
