"""Ouroboros speculative decoding for vLLM.

Switch it on with ``--speculative-config '{"method": "custom_class",
"model": "ouroboros_vllm.OuroborosProposer", "num_speculative_tokens": K}'`` and configure it with
``--additional-config '{"ouroboros": {...}}'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["OuroborosProposer", "__version__"]

if TYPE_CHECKING:
    from ouroboros_vllm.vllm_plugin.proposer import OuroborosProposer


def __getattr__(name: str) -> Any:
    # Imported lazily: `import ouroboros_vllm` (the CLI, the plugin entry point) must not pull in torch.
    if name == "OuroborosProposer":
        from ouroboros_vllm.vllm_plugin.proposer import OuroborosProposer

        return OuroborosProposer
    raise AttributeError(f"module 'ouroboros_vllm' has no attribute {name!r}")
