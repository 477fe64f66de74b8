"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Everything written here ends with the permissions any other tool's ``open(path, "w")`` would
give a new file: ``0o666 & ~umask`` (``0o777 & ~umask`` for folders). Temporary files and
folders are private (``mkstemp``: 0600, ``mkdtemp``: 0700), and so are the files some writers
make themselves (safetensors writes its own temporary file and renames it, keeping 0600); a
rename keeps that mode, so :func:`publish` sets the normal one just before the rename. Without
it a LoRA or model written by one user cannot be read by a server running as another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def umask() -> int:
    """The process umask. Read from ``/proc`` where there is one: ``os.umask`` can only read
    it by setting it, which races with other threads creating files (the brief value set here
    is the strict 0o077, so such a file would be too private rather than too open)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~umask()


def set_default_modes(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes of newly created files."""
    root = Path(path)
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    if not root.is_dir():
        os.chmod(root, file_mode)
        return
    os.chmod(root, dir_mode)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(parent, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(parent, name), file_mode)


def publish(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename a finished temporary file or folder onto ``target`` with normal permissions."""
    set_default_modes(tmp)
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The writer may write the file in place or replace it (safetensors does); either way the
    result gets the umask's mode. On an exception the temporary file is removed and ``path``
    is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        publish(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (an existing
    folder there is removed first), with normal permissions throughout. On an exception the
    temporary folder is removed and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: object) -> Iterator[IO]:
    """``open`` for writing, atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:  # type: ignore[call-overload]
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
