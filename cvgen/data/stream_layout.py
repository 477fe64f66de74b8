"""Where streamed data lives: local litdata chunk folders or s3:// / gs:// URLs, and their
``train`` / ``validation`` layout. Kept apart from :mod:`cvgen.data.stream` so that telling a
stream from a dataset folder needs no litdata (it is imported only when streaming)."""

from __future__ import annotations

import os
from pathlib import Path

REMOTE_PREFIXES = ("s3://", "gs://")
INDEX_FILE = "index.json"
SPLIT_DIRS = ("train", "validation")


def is_remote(root: str) -> bool:
    return str(root).startswith(REMOTE_PREFIXES)


def is_stream_root(root: str | os.PathLike[str]) -> bool:
    """True for an s3:// / gs:// URL or a local folder of litdata chunks (``index.json``,
    or ``train/index.json``); False for a dataset folder (``metadata.jsonl``)."""
    root = str(root)
    if is_remote(root):
        return True
    p = Path(root)
    return (p / INDEX_FILE).is_file() or (p / "train" / INDEX_FILE).is_file()


def stream_dirs(root: str) -> tuple[str, str | None]:
    """(training chunk dir, validation chunk dir or None) of a stream root."""
    root = root.rstrip("/")
    if is_remote(root):
        return f"{root}/train", f"{root}/validation"  # optimize_dataset writes both
    p = Path(root)
    if (p / INDEX_FILE).is_file():
        return root, None
    val = p / "validation"
    return str(p / "train"), str(val) if (val / INDEX_FILE).is_file() else None
