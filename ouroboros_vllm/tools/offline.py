"""Helpers for offline ``LLM()`` use: the speculative config that selects our proposer, CPU defaults,
and access to the proposer instance of an in-process engine (tests, demo, benchmarks)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm import LLM

PROPOSER_CLASS = "ouroboros_vllm.OuroborosProposer"

# Settings that make vLLM's CPU build usable in one process (see the README, "Offline batches"): an in-process engine
# shares our process (no second copy of the weights, direct access to the proposer) and needs OpenMP
# threads set explicitly or it crawls.
CPU_ENV_DEFAULTS = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": str(os.cpu_count() or 1),
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_cpu_env_defaults() -> None:
    """Set :data:`CPU_ENV_DEFAULTS` where the user has not set them (call before importing vLLM). Where torch sees
    a CUDA device, vLLM picks its platform itself: ``VLLM_TARGET_DEVICE=cpu`` would put the engine on the CPU."""
    import torch

    on_gpu = torch.cuda.is_available()
    for key, value in CPU_ENV_DEFAULTS.items():
        if not (on_gpu and key == "VLLM_TARGET_DEVICE"):
            os.environ.setdefault(key, value)


def speculative_config(num_speculative_tokens: int) -> dict[str, Any]:
    """``speculative_config`` for ``LLM()`` that selects the Ouroboros proposer."""
    return {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": num_speculative_tokens}


def make_llm(
    model: str,
    *,
    ouroboros: dict[str, Any] | None = None,
    num_speculative_tokens: int = 4,
    speculative: dict[str, Any] | None = None,
    kv_cache_gib: float = 1.0,
    max_model_len: int = 2048,
    **llm_kwargs: Any,
) -> LLM:
    """An ``LLM`` with the settings that work on vLLM's CPU build (fp32, eager).

    ``ouroboros`` (the ``additional_config["ouroboros"]`` section) switches our proposer on;
    ``speculative`` passes any other ``speculative_config`` (vLLM's own methods); neither: plain decoding.
    """
    from vllm import LLM

    if ouroboros is not None and speculative is not None:
        raise ValueError("give either ouroboros settings or a speculative_config, not both")
    kwargs: dict[str, Any] = dict(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_model_len,
        kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)),
        seed=0,
    )
    if ouroboros is not None:
        kwargs["speculative_config"] = speculative_config(num_speculative_tokens)
        kwargs["additional_config"] = {"ouroboros": ouroboros}
    elif speculative is not None:
        kwargs["speculative_config"] = speculative
    kwargs.update(llm_kwargs)
    return LLM(**kwargs)


def engine_proposer(llm: LLM) -> Any:
    """The drafter object of an in-process engine's model runner (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    (drafter,) = llm.collective_rpc(_get_drafter)
    return drafter


def _get_drafter(worker: Any) -> Any:
    return getattr(worker.model_runner, "drafter", None)
