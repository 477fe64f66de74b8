"""The dataset folder contract: images plus ``metadata.jsonl``.

One JSON object per line, ``{"file_name": "<path relative to the folder>", "text": "<caption>"}``
(the Hugging Face imagefolder convention, so one folder serves cvgen, ``datasets`` and
diffusers' example scripts). An optional ``"split"`` key (``"train"`` or ``"validation"``)
pins a photo to one side of the held-out split.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvgen.errors import CVGenError

METADATA_FILE = "metadata.jsonl"
SPLITS = ("train", "validation")


class DataError(CVGenError, ValueError):
    """The dataset breaks the contract; the message names the file and the line."""


@dataclass(frozen=True)
class Record:
    """One training example: an image file (absolute path) and its caption."""

    path: Path
    text: str
    line: int
    split: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()


def parse_line(raw: str, where: str) -> dict[str, Any] | None:
    """Parse and validate one metadata line; ``None`` for a blank line.

    ``where`` (``"file:line"``) starts every error message.
    """
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    name = obj.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f'{where}: "file_name" must be a non-empty string, got {name!r}')
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise DataError(f'{where}: "file_name" must be a path inside the folder, got {name!r}')
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f'{where}: "text" (the caption) must be a non-empty string, got {text!r}')
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise DataError(f'{where}: "split" must be one of {", ".join(SPLITS)}, got {split!r}')
    return obj


def read_metadata(root: str | os.PathLike[str]) -> list[Record]:
    """Read ``<root>/metadata.jsonl`` into records, checking every line.

    Raises :class:`DataError` naming the file and the line for a missing metadata file,
    bad JSON, a missing image file, a duplicate entry, or a caption that is not a
    non-empty string.
    """
    root_path = Path(root)
    meta = root_path / METADATA_FILE
    if not meta.is_file():
        raise DataError(f"{meta}: no such file (a dataset folder needs {METADATA_FILE})")
    records: list[Record] = []
    seen: dict[str, int] = {}
    with open(meta, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{meta}:{lineno}"
            obj = parse_line(raw, where)
            if obj is None:
                continue
            name = obj["file_name"]
            if name in seen:
                raise DataError(f"{where}: {name!r} is listed again (first at line {seen[name]})")
            seen[name] = lineno
            path = root_path / name
            if not path.is_file():
                raise DataError(f"{where}: image file {name!r} does not exist")
            extra = tuple(
                sorted((k, v) for k, v in obj.items() if k not in ("file_name", "text", "split"))
            )
            records.append(Record(path, obj["text"], lineno, obj.get("split"), extra))
    if not records:
        raise DataError(f"{meta}: no entries")
    return records


def write_metadata(root: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """Write ``metadata.jsonl`` atomically."""
    from cvgen.fsutil import atomic_write_text

    path = Path(root) / METADATA_FILE
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def split_records(
    records: list[Record], val_fraction: float, max_val: int | None = None
) -> tuple[list[Record], list[Record]]:
    """Split into (train, validation). A record's ``split`` field decides where given;
    the others are held out by a stable hash of their file name, so the split does not change
    when photos are added or reordered. With ``val_fraction > 0`` at least one photo is held
    out (when there are two or more)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    pinned_val = [r for r in records if r.split == "validation"]
    pinned_train = [r for r in records if r.split == "train"]
    free = [r for r in records if r.split is None]
    want = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) >= 2:
        want = max(want, 1)
    if max_val is not None:
        want = min(want, max_val)
    need = max(0, want - len(pinned_val))
    ranked = sorted(free, key=lambda r: hashlib.sha1(r.path.name.encode()).hexdigest())
    val_names = {r.path for r in ranked[:need]}
    train = pinned_train + [r for r in free if r.path not in val_names]
    val = pinned_val + [r for r in free if r.path in val_names]
    if not train:
        raise DataError("no training images left after the validation split")
    return train, val
