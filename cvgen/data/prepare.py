"""``cvgen data prepare``: photos from a URL list or a folder -> a checked dataset folder.

Every row is fetched (HTTP with retries, or read from disk), decoded fully, oriented, checked
(size, decompression bombs), searched for exactly one face and cropped to head and shoulders
at the target aspect, then de-duplicated (SHA-256 and dHash). Rows run in a bounded thread
pool; a failed row becomes one line of ``rejected.jsonl`` and never stops the others.

Output (every file written atomically)::

    DIR/images/<name>-<key>.jpg   the crops
    DIR/metadata.jsonl            {"file_name", "text", ["split"], "source", "sha256", "dhash"}
    DIR/rejected.jsonl            {"where", "source", "reason", "detail"} per rejected row
    DIR/summary.json              counts per outcome and per rejection reason

Re-running skips rows whose crop (same source, same settings) is already in the folder and
removes crops that no row produces any more. The outputs depend only on the inputs and the
settings (no timestamps), so the folder's DVC hash is reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cvgen.data.dedupe import DuplicateIndex, dhash, sha256_bytes
from cvgen.data.download import FetchError, HttpConfig, check_image_bytes, fetch, make_client
from cvgen.data.faces import FaceDetector, crop_to, head_and_shoulders, output_size
from cvgen.data.metadata import METADATA_FILE, DataError
from cvgen.data.sources import Row, read_source
from cvgen.fsutil import atomic_write_text
from cvgen.images import (
    MAX_IMAGE_PIXELS,
    ImageError,
    open_image,
    resize_and_crop,
    save_image_atomic,
)

REJECTED_FILE = "rejected.jsonl"
SUMMARY_FILE = "summary.json"
IMAGES_DIR = "images"
# more pixels per byte of file than any photo compresses to: a decompression bomb
BOMB_PIXELS_PER_BYTE = 100


@dataclass
class PrepareConfig:
    """Settings of ``cvgen data prepare`` (the CLI flags of the same names).

    Args:
        resolution: longer side of the output images in pixels.
        aspect: output aspect ratio, width / height (1.0: square; 0.8: 4:5 portrait).
        min_size: reject photos whose shorter side is below this (px).
        max_pixels: reject photos with more pixels than this (too large).
        no_face: ``reject`` photos without a face, or ``center``-crop them.
        multiple_faces: ``reject`` photos with several faces, or crop the ``largest``.
        face_fraction: the face's share of the crop height (smaller: more shoulders).
        near_duplicate_bits: dHash distance up to which photos are near duplicates (0: off).
        workers: rows fetched and processed at once (threads; bounds HTTP concurrency).
        quality: JPEG quality of the crops.
        cascade: OpenCV Haar cascade (file in ``cv2.data.haarcascades`` or a path).
        http: timeouts, retries, size cap.
    """

    resolution: int = 512
    aspect: float = 1.0
    min_size: int = 256
    max_pixels: int = MAX_IMAGE_PIXELS
    no_face: str = "reject"
    multiple_faces: str = "reject"
    face_fraction: float = 0.35
    near_duplicate_bits: int = 6
    workers: int = 8
    quality: int = 95
    cascade: str = "haarcascade_frontalface_alt2.xml"
    http: HttpConfig = field(default_factory=HttpConfig)

    def __post_init__(self) -> None:
        if self.no_face not in ("reject", "center"):
            raise DataError(f"no_face must be reject or center, got {self.no_face!r}")
        if self.multiple_faces not in ("reject", "largest"):
            raise DataError(
                f"multiple_faces must be reject or largest, got {self.multiple_faces!r}"
            )
        if self.resolution < 8 or self.workers < 1 or self.aspect <= 0:
            raise DataError("resolution >= 8, workers >= 1 and aspect > 0 are required")

    def fingerprint(self) -> str:
        """The settings that change a crop (not timeouts or worker counts)."""
        keys = (
            "resolution",
            "aspect",
            "no_face",
            "multiple_faces",
            "face_fraction",
            "quality",
            "cascade",
        )
        return json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Outcome:
    index: int
    row: Row
    file_name: str = ""
    reason: str = ""  # empty: accepted
    detail: str = ""
    sha256: str = ""
    dhash: int = 0
    reused: bool = False


@dataclass
class Summary:
    """What a run did: counts per outcome and per rejection reason."""

    rows: int = 0
    accepted: int = 0
    reused: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def output_name(row: Row, cfg: PrepareConfig) -> str:
    """``images/<slug>-<key>.jpg``: the key hashes the source and the crop settings."""
    key = hashlib.sha1(f"{row.src}\n{cfg.fingerprint()}".encode()).hexdigest()[:12]
    stem = row.src.rstrip("/").rsplit("/", 1)[-1].split("?")[0].rsplit(".", 1)[0]
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40] or "img"
    return f"{IMAGES_DIR}/{slug}-{key}.jpg"


def _load(row: Row, client: Any, cfg: PrepareConfig) -> bytes:
    if row.is_url:
        try:
            return fetch(client, row.src, cfg.http)
        except FetchError as e:
            raise Rejected(e.reason, e.detail) from e
    path = Path(row.src)
    try:
        size = path.stat().st_size
        if size > cfg.http.max_bytes:
            raise Rejected(
                "too_large", f"{path}: {size} bytes is over the {cfg.http.max_bytes} cap"
            )
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise Rejected("missing_file", f"{row.where}: {path}: no such file") from e
    except OSError as e:
        raise Rejected("unreadable", f"{path}: {e.strerror or e}") from e
    try:
        check_image_bytes(data, str(path))
    except FetchError as e:
        raise Rejected(e.reason, e.detail) from e
    return data


def decode(data: bytes, where: str, cfg: PrepareConfig) -> Image.Image:
    """Check the size in the header, then decode fully (oriented RGB); :class:`Rejected` with
    ``decompression_bomb``, ``too_large``, ``truncated``, ``unreadable`` or ``too_small``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
    except Image.DecompressionBombError as e:
        raise Rejected("decompression_bomb", f"{where}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise Rejected("unreadable", f"{where}: not a readable image ({e})") from e
    if w * h > cfg.max_pixels:
        bomb = w * h > BOMB_PIXELS_PER_BYTE * len(data)
        reason = "decompression_bomb" if bomb else "too_large"
        raise Rejected(
            reason, f"{where}: {w}x{h} from {len(data)} bytes (limit {cfg.max_pixels} pixels)"
        )
    if min(w, h) < cfg.min_size:
        raise Rejected("too_small", f"{where}: {w}x{h} is under the {cfg.min_size}px minimum side")
    try:
        return open_image(data, max_pixels=cfg.max_pixels)
    except ImageError as e:
        reason = "truncated" if "truncated" in str(e).lower() else "unreadable"
        raise Rejected(reason, f"{where}: {str(e).removeprefix('<bytes>: ')}") from e


def frame(img: Image.Image, where: str, cfg: PrepareConfig, detector: FaceDetector) -> Image.Image:
    """The head-and-shoulders crop at the target size (or :class:`Rejected` for no/several faces)."""
    size = output_size(cfg.resolution, cfg.aspect)
    faces = detector.detect(img)
    if not faces:
        if cfg.no_face == "reject":
            raise Rejected("no_face", f"{where}: no face found")
        return resize_and_crop(img, *size)
    if len(faces) > 1 and cfg.multiple_faces == "reject":
        raise Rejected("multiple_faces", f"{where}: {len(faces)} faces found")
    box = head_and_shoulders(faces[0], img.width, img.height, cfg.aspect, cfg.face_fraction)
    return crop_to(img, box, size)


def _work(
    i: int, row: Row, out: Path, cfg: PrepareConfig, client: Any, detector: FaceDetector
) -> Outcome:
    res = Outcome(i, row, output_name(row, cfg))
    try:
        data = _load(row, client, cfg)
        img = decode(data, row.where, cfg)
        res.sha256, res.dhash = sha256_bytes(data), dhash(img)
        crop = frame(img, row.where, cfg, detector)
        save_image_atomic(crop, out / res.file_name, quality=cfg.quality)
    except Rejected as e:
        res.reason, res.detail = e.reason, e.detail
    except Exception as e:  # a bug or an odd file must not stop the other rows
        res.reason, res.detail = "error", f"{row.where}: {type(e).__name__}: {e}"
    return res


def _previous(out: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run's metadata.jsonl (by file name) whose image is still there."""
    meta = out / METADATA_FILE
    rows: dict[str, dict[str, Any]] = {}
    if meta.is_file():
        for raw in meta.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if (
                isinstance(obj, dict)
                and "dhash" in obj
                and (out / str(obj.get("file_name"))).is_file()
            ):
                rows[obj["file_name"]] = obj
    return rows


def prepare(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: PrepareConfig | None = None,
    progress: bool = True,
) -> Summary:
    """Prepare the photos listed by ``src`` into the dataset folder ``out``; see the module
    docstring. Raises :class:`DataError` when the source cannot be read or no photo passed."""
    from tqdm import tqdm

    cfg = cfg or PrepareConfig()
    rows = read_source(src)
    out_path = Path(out)
    (out_path / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    previous = _previous(out_path)
    detector = FaceDetector(cfg.cascade)
    outcomes: list[Outcome] = []
    todo: list[tuple[int, Row]] = []
    names: set[str] = set()
    for i, row in enumerate(rows):
        name = output_name(row, cfg) if not row.error else ""
        if row.error:
            outcomes.append(Outcome(i, row, reason=row.error[0], detail=row.error[1]))
        elif name in names:
            outcomes.append(
                Outcome(i, row, name, "duplicate", f"{row.where}: {row.src} is listed again")
            )
        elif name in previous:
            prev = previous[name]
            outcomes.append(
                Outcome(
                    i, row, name, sha256=prev["sha256"], dhash=int(prev["dhash"], 16), reused=True
                )
            )
        else:
            todo.append((i, row))
        names.add(name)
    bar = tqdm(
        total=len(rows), desc="prepare", unit="photo", disable=not progress, initial=len(outcomes)
    )
    with make_client(cfg.http, cfg.workers) as client, ThreadPoolExecutor(cfg.workers) as pool:
        futures = [pool.submit(_work, i, row, out_path, cfg, client, detector) for i, row in todo]
        for fut in as_completed(futures):
            outcomes.append(fut.result())
            bar.update(1)
    bar.close()
    return _finish(out_path, sorted(outcomes, key=lambda o: o.index), cfg)


def _finish(out: Path, outcomes: list[Outcome], cfg: PrepareConfig) -> Summary:
    """De-duplicate in row order (the first copy wins), write the three files, prune crops."""
    index = DuplicateIndex(cfg.near_duplicate_bits)
    meta: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    summary = Summary(rows=len(outcomes))
    for o in outcomes:
        if not o.reason:
            dup = index.check(o.sha256, o.dhash)
            if dup is not None:
                o.reason, o.detail = dup[0], f"{o.row.where}: same photo as {dup[1]}"
                if not o.reused:
                    (out / o.file_name).unlink(missing_ok=True)
            else:
                index.add(o.sha256, o.dhash, o.row.src)
        if o.reason:
            rejected.append(
                {"where": o.row.where, "source": o.row.src, "reason": o.reason, "detail": o.detail}
            )
            summary.rejected[o.reason] = summary.rejected.get(o.reason, 0) + 1
            continue
        row: dict[str, Any] = {"file_name": o.file_name, "text": o.row.caption}
        if o.row.split:
            row["split"] = o.row.split
        row.update(source=o.row.src, sha256=o.sha256, dhash=f"{o.dhash:016x}")
        meta.append(row)
        summary.accepted += 1
        summary.reused += o.reused
    summary.rejected = dict(Counter(summary.rejected).most_common())
    keep = {m["file_name"] for m in meta}
    for f in (out / IMAGES_DIR).iterdir():
        if f"{IMAGES_DIR}/{f.name}" not in keep and f.is_file() and not f.name.startswith("."):
            f.unlink()
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in meta)
    atomic_write_text(out / METADATA_FILE, lines)
    atomic_write_text(
        out / REJECTED_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)
    )
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2) + "\n")
    if not meta:
        raise DataError(f"{out / REJECTED_FILE}: no photo passed the checks ({summary.rejected})")
    return summary
