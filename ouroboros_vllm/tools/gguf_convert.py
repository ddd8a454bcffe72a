"""Converting a GGUF into a float32 Hugging Face folder that vLLM and transformers load like any other."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ouroboros_vllm.tools.model_sources import ModelError, ModelSpec, say


def require_converter() -> None:
    """Fail before downloading anything if transformers cannot load a GGUF here."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"converting the GGUF with transformers needs {', '.join(missing)}: pip install {' '.join(missing)}"
        )


def convert(spec: ModelSpec, folder: Path, *, progress: bool = True) -> None:
    """Convert ``folder/spec.gguf_file`` into a float32 Hugging Face model in ``folder`` itself."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    bars_were_enabled = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        step = time.perf_counter()
        say(progress, f"[{spec.name}] converting the tokenizer ...")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
        config = AutoConfig.from_pretrained(folder, gguf_file=spec.gguf_file)
        # The GGUF has no limit for the tokenizer; use the model's context length, as upstream does.
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.save_pretrained(folder)
        eos_ids: list[int] = []
        for token in spec.eos_tokens:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
                raise ModelError(f"{spec.name}: eos token {token!r} is not in the vocabulary")
            eos_ids.append(token_id)
        del tokenizer
        say(progress, f"[{spec.name}] tokenizer saved in {time.perf_counter() - step:.1f} s")

        step = time.perf_counter()
        say(progress, f"[{spec.name}] loading the GGUF with transformers (dequantizing to float32) ...")
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=spec.gguf_file,
            dtype=torch.float32,
            # Unpack every weight to dense float32 even where transformers could keep GGUF blocks.
            quantization_config=GgufConfig(dequantize=True),
        )
        clear_quantization(model)
        if eos_ids:
            model.generation_config.eos_token_id = eos_ids
        say(progress, f"[{spec.name}] loaded in {time.perf_counter() - step:.1f} s; saving float32 safetensors ...")
        step = time.perf_counter()
        model.save_pretrained(folder)
        del model
        say(progress, f"[{spec.name}] saved in {time.perf_counter() - step:.1f} s")
    finally:
        if bars_were_enabled:
            transformers.utils.logging.enable_progress_bar()

    # What vLLM will read back: a plain (unquantized) config and a working tokenizer with the GGUF's
    # chat template and eos token.
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        raise ModelError(f"{spec.name}: the saved config.json still has a quantization_config")
    reloaded = AutoTokenizer.from_pretrained(folder)
    if reloaded.eos_token is None or not reloaded.chat_template:
        raise ModelError(f"{spec.name}: the saved tokenizer lost its eos token or chat template")


def clear_quantization(model: Any) -> None:
    """Turn a model loaded from a GGUF into a plain one that ``save_pretrained`` accepts.

    transformers (5.x) loads every GGUF through its ``GgufHfQuantizer``. Loaded plainly, the model keeps
    it: ``model.hf_quantizer`` (whose ``is_serializable()`` is False, which is all ``save_pretrained``
    checks before raising "quantized with gguf and is not serializable"), ``model.is_quantized = True``,
    ``model.quantization_method``, ``config.quantization_config = GgufConfig(...)`` and
    ``config._is_quantized``. Loaded with ``quantization_config=GgufConfig(dequantize=True)``, as
    :func:`convert` does, the quantizer's ``remove_quantization_config`` has already dropped all of
    them; this makes sure of it either way (and that no weight was left in packed GGUF blocks).
    """
    from transformers import PreTrainedModel

    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise ModelError(f"GGUF weights were left packed in {packed[:3]}...; expected a dense model")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config.__dict__.pop("_is_quantized", None)
            module.config.__dict__.pop("quantization_config", None)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise ModelError("could not clear the GGUF quantizer from the model")
