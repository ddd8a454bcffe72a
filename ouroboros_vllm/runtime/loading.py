"""Loading the draft model: where it is, whether it shares the target's tokenizer, and its precision.

The draft is a Hugging Face causal LM run with transformers beside the vLLM target (see
:mod:`ouroboros_vllm.runtime.draft_runtime` for why). On CPU it runs with int8 weights by default.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BY_DTYPE = {dtype: name for name, dtype in _DTYPES.items()}


class DraftModelError(ValueError):
    """The draft model cannot be used with this target (missing, another tokenizer, an unsupported kind)."""


@dataclass(frozen=True)
class LoadedDraft:
    model: torch.nn.Module  # a transformers causal LM, in eval mode, on its device
    eos_token_ids: frozenset[int]
    precision: str


def load_draft_model(path: str, *, target_tokenizer: str, device: torch.device, precision: str) -> LoadedDraft:
    """Load the draft from ``path`` after checking that it shares the target's tokenizer.

    ``precision`` is a dtype name, or ``"int8"``: float32 weights quantized once at load (see
    :func:`quantize_int8`).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_path(path)
    check_same_tokenizer(source, target_tokenizer)
    dtype = torch.float32 if precision == "int8" else _DTYPES[precision]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    if precision == "int8":
        model = quantize_int8(model)
    eos = model.generation_config.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
    logger.info("ouroboros-vllm: draft model %s loaded (%s, %s)", source, precision, device)
    return LoadedDraft(model, eos_ids, precision)


def resolve_model_path(path: str) -> str:
    """A local folder, or a Hugging Face Hub id; a path that looks local must exist."""
    expanded = Path(os.path.expanduser(path))
    if expanded.is_dir():
        return str(expanded.resolve())
    looks_local = path.startswith(("/", ".", "~")) or expanded.exists() or path.count("/") != 1
    if looks_local:
        raise DraftModelError(
            f'additional_config["ouroboros"]["draft_model"]: no model folder at {str(expanded.absolute())!r} '
            "(give the folder of a Hugging Face causal LM, e.g. from `ouroboros-vllm models path NAME`)"
        )
    return path


def check_same_tokenizer(draft_path: str, target_tokenizer: str) -> None:
    """Refuse a draft whose tokenizer maps any token to another id than the target's tokenizer does."""
    draft_vocab = tokenizer_vocab(draft_path)
    target_vocab = tokenizer_vocab(target_tokenizer)
    if draft_vocab == target_vocab:
        return
    # Tokens the two map differently (or only one of them knows), in the target's id order.
    differing = sorted(
        set(draft_vocab) ^ set(target_vocab) | {t for t in target_vocab if draft_vocab.get(t, -1) != target_vocab[t]},
        key=lambda token: (target_vocab.get(token, len(target_vocab)), token),
    )
    examples = ", ".join(
        f"{token!r} is {draft_vocab.get(token)} in the draft and {target_vocab.get(token)} in the target"
        for token in differing[:3]
    )
    raise DraftModelError(
        f"draft model {draft_path!r} has another tokenizer than the target {target_tokenizer!r}: "
        f"{len(draft_vocab)} and {len(target_vocab)} tokens, {len(differing)} of them mapped differently "
        f"(e.g. {examples}); Ouroboros needs a draft that shares the target's tokenizer"
    )


def tokenizer_vocab(path: str) -> dict[str, int]:
    """The (token, id) map of the tokenizer at ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def resolve_precision(name: str, target_dtype: torch.dtype, device: torch.device) -> str:
    """The draft's precision for the ``draft_dtype`` setting: ``"auto"`` is int8 on CPU, else the target's dtype.

    Measured on a 2-core AVX-512 CPU (Qwen2.5-Coder 0.5B, one new token after 200 cached, transformers 5.19):
    float32 162 ms, bfloat16 80 ms, int8 31 ms a forward. A small model's forward there is bound by reading its
    weights, so the narrowest weights win. On GPUs, PyTorch's int8 dynamic quantization has no kernels.
    """
    if name == "auto":
        return "int8" if device.type == "cpu" else _BY_DTYPE.get(target_dtype, "float32")
    if name == "int8" and device.type != "cpu":
        raise DraftModelError(
            f'additional_config["ouroboros"]["draft_dtype"] = "int8" runs on CPU only (the draft is on {device}); '
            'use "auto", "bfloat16" or "float16"'
        )
    return name


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Int8 weights (per output channel) for every Linear layer, activations quantized at run time, in place.

    PyTorch's dynamic quantization (fbgemm kernels) is the fastest CPU path we measured: torchao's int8
    configs without ``torch.compile`` ran 5-10x slower on the same CPU, and a per-token int8 layer of our own
    (``torch._int_mm``) cost 25-70% more a forward, 2.2x instead of 2.7x end to end. The price: activations
    are scaled once per forward, so a token's logits depend slightly on the other tokens of its forward and
    phrase-by-phrase drafting is no longer bit-for-bit the one-token greedy loop (measured on Qwen2.5-Coder 0.5B,
    code prompts: 11 of 18 rounds identical). It never changes the output, which the target verifies; the
    exact-drafting property holds for the float dtypes.
    """
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; its CPU kernels are still PyTorch's own.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
