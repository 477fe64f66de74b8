"""Drift features of a folder of photos: the reference set, or a sample of production photos
(``cvgen monitor reference`` and ``cvgen monitor drift --current FOLDER``).

A folder is read the way ``cvgen data prepare --src FOLDER`` reads it: the files its
``metadata.jsonl`` lists, in that order, or else every image under it (sorted; hidden
folders skipped). Captions are not needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cvgen.data.sources import IMAGE_SUFFIXES
from cvgen.errors import CVGenError
from cvgen.faces import FaceDetector
from cvgen.images import ImageError, open_image
from cvgen.monitor.features import photo_features

# metadata keys that only ``cvgen data prepare`` writes: its images are crops
_PREPARED_KEYS = frozenset({"source", "sha256", "dhash"})


@dataclass
class FolderFeatures:
    """Features of the readable photos of a folder, and the photos that could not be read."""

    names: list[str] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (name, why)


def list_photos(folder: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` of the photos of ``folder`` (name: relative to the folder).

    Raises :class:`CVGenError` for a missing folder, a folder without photos, a
    ``metadata.jsonl`` that lists URLs, and a folder written by ``cvgen data prepare`` (its
    images are head-and-shoulders crops, not photos as users send them).
    """
    from cvgen.data.metadata import METADATA_FILE, DataError
    from cvgen.data.sources import read_source

    root = Path(folder)
    if not root.is_dir():
        raise CVGenError(f"{root}: no such folder")
    meta = root / METADATA_FILE
    if meta.is_file():
        _refuse_prepared(root)
        try:
            rows = read_source(root)
        except DataError as e:
            raise CVGenError(str(e)) from e
        out = []
        for r in rows:
            if not r.src:  # a line that names no image: the error says which
                raise CVGenError(r.error[1] if r.error else f"{meta}: a row without an image")
            if r.is_url:
                raise CVGenError(f"{r.where}: {r.src} is a URL; this reads local photos")
            path = Path(r.src)
            out.append(
                (path.relative_to(root).as_posix() if path.is_relative_to(root) else r.src, path)
            )
        return out
    photos = [
        (p.relative_to(root).as_posix(), p)
        for p in sorted(root.rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if not photos:
        raise CVGenError(f"{root}: no photos ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return photos


def _refuse_prepared(root: Path) -> None:
    import json

    from cvgen.data.metadata import METADATA_FILE

    with open(root / METADATA_FILE, encoding="utf-8") as fh:
        first = next((line for line in fh if line.strip()), "")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return  # read_source names the line
    if isinstance(obj, dict) and obj.keys() >= _PREPARED_KEYS:
        raise CVGenError(
            f"{root} was written by cvgen data prepare: its images are crops, not photos as "
            f"users send them. Its reference profile, from the source photos, is "
            f"{root / 'reference_profile.json'}; or point at the folder of source photos"
        )


def folder_features(
    folder: str | os.PathLike[str],
    detector: FaceDetector,
    strict: bool = True,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> FolderFeatures:
    """Features of every photo of ``folder`` (see :func:`list_photos`), in its order.

    ``strict``: an unreadable photo is an error naming it (the reference set); otherwise it is
    skipped and listed in ``unreadable`` (a dump of production photos may hold anything).
    ``workers`` threads decode and measure photos at once (OpenCV releases the GIL).
    """
    photos = list_photos(folder)

    def one(item: tuple[str, Path]) -> dict[str, float] | str:
        try:
            return photo_features(open_image(item[1]), detector)
        except ImageError as e:
            if strict:
                raise
            return str(e)

    out = FolderFeatures()
    n = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(n) as pool:
        for (name, _), res in zip(photos, pool.map(one, photos), strict=True):
            if isinstance(res, str):
                out.unreadable.append((name, res))
            else:
                out.names.append(name)
                out.rows.append(res)
            if progress is not None:
                progress(1)
    if not out.rows:
        raise CVGenError(f"{folder}: none of its {len(photos)} photos could be read")
    return out
