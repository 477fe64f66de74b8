"""What ``cvgen data prepare`` reads: rows of (image URL or path, caption).

A source is one of
- a CSV file with a header; the image column is one of ``url``, ``path``, ``file_name``,
  ``image``; the caption column is ``caption`` or ``text``; an optional ``split`` column;
- a JSONL file of objects with the same keys;
- a folder with its own ``metadata.jsonl`` (the cvgen layout), or images with sidecar
  ``.txt`` captions (``photo.jpg`` + ``photo.txt``).

Relative paths are resolved against the folder of the list. A row that cannot be used (no
caption, a bad line) is not an error for the whole run: it becomes a :class:`Row` with an
``error`` and is reported as a rejection.
"""

from __future__ import annotations

import csv
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from cvgen.data.metadata import METADATA_FILE, SPLITS, DataError

IMAGE_KEYS = ("url", "path", "file_name", "image", "src")
CAPTION_KEYS = ("caption", "text")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_CAPTION_CHARS = 2000


@dataclass(frozen=True)
class Row:
    """One source row. ``where`` is ``file:line`` (or the image path for a folder)."""

    where: str
    src: str
    caption: str
    split: str | None = None
    error: tuple[str, str] | None = None  # (reason, detail) when the row itself is unusable

    @property
    def is_url(self) -> bool:
        return self.src.startswith(("http://", "https://"))


def validate_caption(text: object, max_chars: int = MAX_CAPTION_CHARS) -> str:
    """A clean caption (NFC, whitespace collapsed) or :class:`ValueError` saying why not:
    not a string, empty or only whitespace/control characters, or longer than ``max_chars``."""
    if not isinstance(text, str):
        raise ValueError(f"the caption must be a string, got {type(text).__name__}")
    clean = " ".join("".join(" " if unicodedata.category(c)[0] == "C" else c for c in text).split())
    clean = unicodedata.normalize("NFC", clean)
    if not clean:
        raise ValueError("the caption is empty")
    if len(clean) > max_chars:
        raise ValueError(f"the caption has {len(clean)} characters (at most {max_chars})")
    return clean


def _pick(obj: dict[str, object], keys: tuple[str, ...]) -> object:
    for k in keys:
        if obj.get(k) not in (None, ""):
            return obj[k]
    return None


def _row(obj: dict[str, object], where: str, base: Path) -> Row:
    src = _pick(obj, IMAGE_KEYS)
    if not isinstance(src, str) or not src.strip():
        return Row(where, "", "", error=("bad_row", f"{where}: no image ({'/'.join(IMAGE_KEYS)})"))
    src = src.strip()
    if not src.startswith(("http://", "https://")):
        src = str(base / os.path.expanduser(src))
    split = obj.get("split")
    if split not in (None, "", *SPLITS):
        return Row(
            where, src, "", error=("bad_row", f"{where}: split {split!r} is not one of {SPLITS}")
        )
    try:
        caption = validate_caption(_pick(obj, CAPTION_KEYS))
    except ValueError as e:
        return Row(where, src, "", error=("bad_caption", f"{where}: {e}"))
    return Row(where, src, caption, split if isinstance(split, str) and split else None)


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                rows.append(
                    Row(where, "", "", error=("bad_row", f"{where}: not valid JSON ({e.msg})"))
                )
                continue
            if not isinstance(obj, dict):
                rows.append(Row(where, "", "", error=("bad_row", f"{where}: not a JSON object")))
                continue
            rows.append(_row(obj, where, path.parent))
    return rows


def _read_csv(path: Path) -> list[Row]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if not set(fields) & set(IMAGE_KEYS) or not set(fields) & set(CAPTION_KEYS):
            raise DataError(
                f"{path}:1: the header needs an image column ({', '.join(IMAGE_KEYS)}) and a "
                f"caption column ({', '.join(CAPTION_KEYS)}), got {reader.fieldnames}"
            )
        reader.fieldnames = fields
        # line numbers count the header as line 1
        return [_row(dict(r), f"{path}:{reader.line_num}", path.parent) for r in reader]


def _read_folder(path: Path) -> list[Row]:
    if (path / METADATA_FILE).is_file():
        return _read_jsonl(path / METADATA_FILE)
    rows = []
    for img in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        if any(part.startswith(".") for part in img.relative_to(path).parts):
            continue
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            rows.append(Row(str(img), str(img), "", error=("no_caption", f"{img}: no {txt.name}")))
            continue
        try:
            caption = validate_caption(txt.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            rows.append(Row(str(img), str(img), "", error=("bad_caption", f"{txt}:1: {e}")))
            continue
        rows.append(Row(str(img), str(img), caption))
    return rows


def read_source(src: str | os.PathLike[str]) -> list[Row]:
    """The rows of a CSV, a JSONL file or a folder (see the module docstring)."""
    path = Path(src)
    if path.is_dir():
        rows = _read_folder(path)
    elif not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    elif path.suffix.lower() == ".csv":
        rows = _read_csv(path)
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = _read_jsonl(path)
    else:
        raise DataError(
            f"{path}: expected a .csv or .jsonl list of (url or path, caption), or a folder"
        )
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
