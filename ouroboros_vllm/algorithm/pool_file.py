"""Saving and loading a PhrasePool (the ``pool_path`` setting): a versioned, checksummed file.

Layout: one JSON header line, then the payload as little-endian int32: for each key, from the least to the
most recently used, ``key, number of phrases, phrases (oldest first, phrase_len ids each)``. The header
records the format version, the phrase length, the target and draft models, a fingerprint of the
tokenizer, the payload's length and its sha256. A file that is corrupt, truncated, of another version or
made with another tokenizer is refused with :class:`PoolFileError`: a pool of foreign token ids would not be
wrong output (verification keeps output exact) but silently useless drafts.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ouroboros_vllm.algorithm.pool import PhrasePool
from ouroboros_vllm.files import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "ouroboros-vllm phrase pool"
VERSION = 1


class PoolFileError(ValueError):
    """A pool file that cannot be used; the message says why and which file."""


@dataclass(frozen=True)
class PoolIdentity:
    """What a saved pool was made with."""

    tokenizer: str  # tokenizer_fingerprint() of the target's tokenizer
    target: str = ""
    draft: str = ""


def tokenizer_fingerprint(vocab: Mapping[str, int]) -> str:
    """A stable hash of a tokenizer's (token, id) pairs."""
    canonical = json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def save_pool(pool: PhrasePool, path: str | os.PathLike[str], identity: PoolIdentity) -> None:
    """Write ``pool`` to ``path`` atomically (a crash leaves the previous file, never half of a new one)."""
    values: list[int] = []
    num_keys = 0
    for key, phrases in pool.items():
        num_keys += 1
        values += [key, len(phrases)]
        for phrase in phrases:
            values += phrase
    payload = np.asarray(values, dtype="<i4").tobytes()
    header = {
        "format": FORMAT,
        "version": VERSION,
        "phrase_len": pool.phrase_len,
        **asdict(identity),
        "num_keys": num_keys,
        "num_phrases": len(pool),
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    atomic_write(path, json.dumps(header).encode() + b"\n" + payload)


def load_pool(path: str | os.PathLike[str], pool: PhrasePool, identity: PoolIdentity) -> dict[str, object]:
    """Insert the phrases saved at ``path`` into ``pool`` (oldest first, so recency is kept); return the header."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PoolFileError(f"cannot read the pool file {str(path)!r}: {error.strerror or error}") from None
    header = _read_header(path, data)
    payload = data[data.index(b"\n") + 1 :]
    if len(payload) != header["payload_bytes"]:
        raise PoolFileError(
            f"pool file {str(path)!r} is truncated or corrupt: {len(payload)} payload bytes, "
            f"the header says {header['payload_bytes']}"
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise PoolFileError(f"pool file {str(path)!r} is corrupt: its payload does not match its checksum")
    if header["tokenizer"] != identity.tokenizer:
        raise PoolFileError(
            f"pool file {str(path)!r} was made with another tokenizer (target {header['target']!r}, draft "
            f"{header['draft']!r}) than this engine's (target {identity.target!r}): its token ids mean other "
            "tokens here; delete it or point pool_path elsewhere"
        )
    if header["phrase_len"] != pool.phrase_len:
        raise PoolFileError(
            f"pool file {str(path)!r} holds phrases of {header['phrase_len']} tokens (N={header['phrase_len'] + 1}) "
            f"but this engine uses {pool.phrase_len} (N={pool.phrase_len + 1})"
        )
    _insert_payload(pool, np.frombuffer(payload, dtype="<i4"), path)
    return header


def _read_header(path: Path, data: bytes) -> dict[str, object]:
    end = data.find(b"\n")
    try:
        header = json.loads(data[:end]) if end >= 0 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PoolFileError(f"{str(path)!r} is not an ouroboros-vllm pool file (or its header is corrupt)")
    if header.get("version") != VERSION:
        raise PoolFileError(
            f"pool file {str(path)!r} has format version {header.get('version')!r}; this ouroboros-vllm reads "
            f"version {VERSION}"
        )
    expected = {
        "phrase_len": int,
        "tokenizer": str,
        "target": str,
        "draft": str,
        "num_keys": int,
        "num_phrases": int,
        "payload_bytes": int,
        "payload_sha256": str,
    }
    for name, kind in expected.items():
        if not isinstance(header.get(name), kind):
            raise PoolFileError(f"pool file {str(path)!r} has a corrupt header (field {name!r})")
    return header


def _insert_payload(pool: PhrasePool, values: np.ndarray, path: Path) -> None:
    items: list[tuple[int, tuple[int, ...]]] = []
    at, n = 0, pool.phrase_len
    while at < len(values):
        if at + 2 > len(values):
            raise PoolFileError(f"pool file {str(path)!r} is corrupt: a key record is cut short")
        key, count = int(values[at]), int(values[at + 1])
        at += 2
        if count < 0 or at + count * n > len(values):
            raise PoolFileError(f"pool file {str(path)!r} is corrupt: key {key} claims {count} phrases")
        items += [(key, tuple(int(t) for t in values[at + i * n : at + (i + 1) * n])) for i in range(count)]
        at += count * n
    pool.insert_many(items)


class PoolFile:
    """The ``pool_path`` setting at work: load at start, save every ``interval_s`` and at process exit."""

    def __init__(self, path: str | os.PathLike[str], identity: PoolIdentity, interval_s: float) -> None:
        self.path = Path(path).expanduser()
        self.identity = identity
        self.interval_s = interval_s
        self._last_save = time.monotonic()
        if self.path.exists():
            if not self.path.is_file() or not os.access(self.path, os.R_OK | os.W_OK):
                raise PoolFileError(f"pool_path {str(self.path)!r} is not a readable and writable file")
        elif not os.access(self.path.parent if self.path.parent.exists() else Path.cwd(), os.W_OK):
            raise PoolFileError(f"pool_path {str(self.path)!r} cannot be created: its folder is not writable")

    def load_into(self, pool: PhrasePool) -> int:
        """Load the saved phrases if the file exists; the number of phrases loaded."""
        if not self.path.exists():
            return 0
        header = load_pool(self.path, pool, self.identity)
        return int(header["num_phrases"])

    def save_at_exit(self, pool: PhrasePool) -> None:
        atexit.register(self.save, pool)

    def maybe_save(self, pool: PhrasePool) -> None:
        if time.monotonic() - self._last_save >= self.interval_s:
            self.save(pool)

    def save(self, pool: PhrasePool) -> None:
        self._last_save = time.monotonic()
        try:
            save_pool(pool, self.path, self.identity)
        except OSError as error:  # a full disk must not take the engine down; the next save tries again
            logger.error("ouroboros-vllm: could not save the phrase pool to %s: %s", self.path, error)
