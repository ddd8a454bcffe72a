"""Files that are either whole or absent: atomic writes, completion markers and a lock (standard library only).

Every layer of the package may use this module: the pool file (``algorithm.pool_file``), the model cache
(``tools.models``) and the tests' model factory all write a file that a crash must never leave half-written,
and mark a folder complete only once everything in it is in place.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename: a crash leaves the
    previous file (or none), never half of the new one. ``fsync`` also survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
        if fsync:
            tmp.flush()
            os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def write_marker(folder: str | os.PathLike[str], name: str, content: str) -> None:
    """Mark ``folder`` complete: write its marker file ``name`` last, atomically and durably."""
    atomic_write(Path(folder) / name, content.encode(), fsync=True)


def read_marker(folder: str | os.PathLike[str], name: str) -> str | None:
    """The content of ``folder``'s marker ``name``, or None when the folder is not marked complete."""
    try:
        return (Path(folder) / name).read_text()
    except (OSError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` across processes (a no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
