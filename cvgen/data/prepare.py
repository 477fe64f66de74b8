"""``cvgen data prepare``: photos from a URL list or a folder -> a checked dataset folder.

Every row is fetched (HTTP with retries and the address checks of :mod:`cvgen.netfetch`, or
read from disk), decoded fully, oriented, checked (size, decompression bombs), searched for
exactly one face and cropped to head and shoulders at the target aspect, then de-duplicated
(SHA-256 and dHash). Rows run in a bounded thread pool; a failed row becomes one line of
``rejected.jsonl`` and never stops the others.

Output (every file written atomically)::

    DIR/images/<name>-<key>.jpg   the crops
    DIR/metadata.jsonl            {"file_name", "text", ["split"], "source", "sha256", "dhash"}
    DIR/rejected.jsonl            {"where", "source", "reason", "detail"} per rejected row
    DIR/summary.json              rows, accepted, and rejections per reason
    DIR/reference_profile.json    drift features of each kept photo (cvgen.monitor.profile)

The reference profile is computed on each source photo as it was read (decoded and oriented),
not on its crop: the server is sent such photos, and its drift monitoring compares them with
these.

Resuming a killed run: while the run goes on, the main thread appends each finished row to
``DIR/.prepare-journal.jsonl`` (one fsync'd line: an accepted row with its hashes, its crop
already on disk, or a rejected row with its reason). A row starts only after an earlier one is
journalled, so at most ``workers`` rows are started and not yet journalled: run the same
command again and it redoes only those and the rows never reached. Failures that may pass on
another try (timeouts, connection errors, HTTP 408/425/429/5xx, unexpected errors) are not
journalled, so the resumed run tries them again; permanent rejections (HTTP 404, not an image,
no face, a refused address, ...) are journalled and not fetched again. A journal made with other
settings is discarded. Once the three files are written the journal is deleted: the finished
folder is the same, byte for byte, as an uninterrupted run's.

Re-running over a finished folder skips rows whose crop (same source, same crop settings) is
listed in its metadata.jsonl, examines rejected rows again (a file may have been fixed, a server
may be back), and removes crops that no row produces any more. The outputs depend only on the
inputs and the settings (no timestamps, no counts of what a run reused), so the folder's DVC
hash is reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Generator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cvgen.data.dedupe import DuplicateIndex, dhash, sha256_bytes
from cvgen.data.download import HttpConfig, check_image_bytes, fetch
from cvgen.data.journal import open_journal
from cvgen.data.metadata import METADATA_FILE, DataError
from cvgen.data.sources import Row, read_source
from cvgen.faces import FaceDetector, crop_to, head_and_shoulders, output_size
from cvgen.fsutil import atomic_write_bytes, atomic_write_text
from cvgen.images import MAX_IMAGE_PIXELS, ImageError, jpeg_bytes, open_image, resize_and_crop
from cvgen.monitor.features import (
    extractor_settings,
    feature_detector,
    photo_features,
    round_features,
)
from cvgen.monitor.profile import PROFILE_FILE, ProfileError, ReferenceProfile, profile_from_rows
from cvgen.netfetch import FetchError, is_transient

REJECTED_FILE = "rejected.jsonl"
SUMMARY_FILE = "summary.json"
IMAGES_DIR = "images"
JOURNAL_FILE = ".prepare-journal.jsonl"
JOURNAL_VERSION = 2
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
        return json.dumps(self._settings(_CROP_KEYS), sort_keys=True)

    def outcome_settings(self) -> dict[str, Any]:
        """The settings that decide any row's outcome: the crop's, and those that accept or
        reject a photo. A journal written under other settings is not reused."""
        return {
            **self._settings((*_CROP_KEYS, "min_size", "max_pixels")),
            "max_bytes": self.http.max_bytes,
            "allow_networks": sorted(self.http.allow_networks),
        }

    def _settings(self, keys: tuple[str, ...]) -> dict[str, Any]:
        return {k: getattr(self, k) for k in keys}


_CROP_KEYS = (
    "resolution",
    "aspect",
    "no_face",
    "multiple_faces",
    "face_fraction",
    "quality",
    "cascade",
)


class Rejected(Exception):
    """A row that does not make it into the dataset, with a reason code and a detail."""

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
    features: dict[str, float | None] | None = None
    reused: bool = False


@dataclass
class Summary:
    """What a run did: counts per outcome and per rejection reason, and how many rows it took
    from an earlier run (``reused``: from the journal of a killed run or a finished folder)."""

    rows: int = 0
    accepted: int = 0
    reused: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """What ``summary.json`` holds: facts of the dataset, not of the run (no ``reused``),
        so a resumed run writes the same file as an uninterrupted one."""
        return {"rows": self.rows, "accepted": self.accepted, "rejected": self.rejected}


def output_name(row: Row, cfg: PrepareConfig) -> str:
    """``images/<slug>-<key>.jpg``: the key hashes the source and the crop settings."""
    key = hashlib.sha1(f"{row.src}\n{cfg.fingerprint()}".encode()).hexdigest()[:12]
    stem = row.src.rstrip("/").rsplit("/", 1)[-1].split("?")[0].rsplit(".", 1)[0]
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:40] or "img"
    return f"{IMAGES_DIR}/{slug}-{key}.jpg"


def _load(row: Row, cfg: PrepareConfig) -> bytes:
    if row.is_url:
        try:
            return fetch(row.src, cfg.http)
        except FetchError as e:
            raise Rejected(e.reason, e.message) from e
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
        raise Rejected(e.reason, e.message) from e
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


@dataclass(frozen=True)
class Detectors:
    """The face detectors of a run: ``frame`` crops with prepare's settings, ``features``
    measures the photo for the reference profile (the drift monitoring's settings)."""

    frame: FaceDetector
    features: FaceDetector


def _work(i: int, row: Row, out: Path, cfg: PrepareConfig, detectors: Detectors) -> Outcome:
    res = Outcome(i, row, output_name(row, cfg))
    try:
        data = _load(row, cfg)
        img = decode(data, row.where, cfg)
        res.sha256, res.dhash = sha256_bytes(data), dhash(img)
        crop = frame(img, row.where, cfg, detectors.frame)
        res.features = round_features(photo_features(img, detectors.features))
        # fsync'd: the crop is on disk before the journal says the row is done
        atomic_write_bytes(out / res.file_name, jpeg_bytes(crop, quality=cfg.quality))
    except Rejected as e:
        res.reason, res.detail = e.reason, e.detail
    except Exception as e:  # a bug or an odd file must not stop the other rows
        res.reason, res.detail = "error", f"{row.where}: {type(e).__name__}: {e}"
    return res


def journal_header(cfg: PrepareConfig) -> dict[str, Any]:
    """The first line of the journal: records made under other settings are not reused."""
    return {
        "journal": "cvgen data prepare",
        "version": JOURNAL_VERSION,
        "settings": cfg.outcome_settings(),
        "features": extractor_settings(cfg.cascade),
    }


def _journal_record(o: Outcome) -> dict[str, Any] | None:
    """The journal line of a finished row; None for a failure worth another try."""
    if not o.reason:
        return {
            "name": o.file_name,
            "sha256": o.sha256,
            "dhash": f"{o.dhash:016x}",
            "features": o.features,
        }
    if o.reason == "error" or is_transient(o.reason):
        return None
    return {"name": o.file_name, "where": o.row.where, "reason": o.reason, "detail": o.detail}


def _reuse(
    i: int, row: Row, name: str, journalled: dict[str, Any] | None, out: Path
) -> Outcome | None:
    """The outcome of a row from the journal or an earlier metadata.jsonl row, if still valid
    (an accepted row's crop must still be there, with its photo's features; a rejection must
    name the same row)."""
    if journalled is None:
        return None
    try:
        if "reason" in journalled:
            if journalled["where"] != row.where:
                return None
            return Outcome(i, row, name, journalled["reason"], journalled["detail"], reused=True)
        features = journalled.get("features")
        if not (out / name).is_file() or not isinstance(features, dict):
            return None
        return Outcome(
            i,
            row,
            name,
            sha256=str(journalled["sha256"]),
            dhash=int(journalled["dhash"], 16),
            features=round_features(features),
            reused=True,
        )
    except (KeyError, TypeError, ValueError):  # a record of another shape: redo the row
        return None


def _previous(out: Path, cfg: PrepareConfig) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run's metadata.jsonl, by file name, with their photos' features
    from its reference profile (none when the profile is missing or made otherwise)."""
    meta = out / METADATA_FILE
    rows: dict[str, dict[str, Any]] = {}
    if meta.is_file():
        for raw in meta.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "file_name" in obj:
                rows[str(obj["file_name"])] = obj
    try:
        profile = ReferenceProfile.load(out / PROFILE_FILE)
    except ProfileError:
        return rows
    if profile.extractor == extractor_settings(cfg.cascade):
        for name, features in zip(profile.file_names, profile.rows, strict=True):
            if name in rows:
                rows[name]["features"] = features
    return rows


def _remove_stale_temps(out: Path) -> None:
    """Delete what an atomic write of a killed run left behind (``.<name>.<random>.tmp``)."""
    for d in (out, out / IMAGES_DIR):
        for f in d.glob(".*.tmp"):
            f.unlink(missing_ok=True)


def _run(
    todo: list[tuple[int, Row]], out: Path, cfg: PrepareConfig, detectors: Detectors
) -> Generator[Outcome, None, None]:
    """Process ``todo`` ``cfg.workers`` rows at a time, yielding each outcome as it finishes.
    A row starts only once the caller has taken an earlier outcome, so no more than
    ``workers`` rows are ever started and not yet taken (what a kill can lose)."""
    pending = iter(todo)
    running: set[Future[Outcome]] = set()
    with ThreadPoolExecutor(cfg.workers) as pool:
        try:
            while True:
                for i, row in itertools.islice(pending, cfg.workers - len(running)):
                    running.add(pool.submit(_work, i, row, out, cfg, detectors))
                if not running:
                    return
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    yield fut.result()
        finally:
            for fut in running:
                fut.cancel()


def prepare(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: PrepareConfig | None = None,
    progress: bool = True,
) -> Summary:
    """Prepare the photos listed by ``src`` into the dataset folder ``out``; see the module
    docstring (resuming included). Raises :class:`DataError` when the source cannot be read
    or no photo passed."""
    from tqdm import tqdm

    cfg = cfg or PrepareConfig()
    rows = read_source(src)
    out_path = Path(out)
    (out_path / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_path)
    previous = _previous(out_path, cfg)
    journal, records = open_journal(out_path / JOURNAL_FILE, journal_header(cfg))
    journalled = {str(r.get("name")): r for r in records}
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
        elif done := (
            _reuse(i, row, name, journalled.get(name), out_path)
            or _reuse(i, row, name, previous.get(name), out_path)
        ):
            outcomes.append(done)
        else:
            todo.append((i, row))
        names.add(name)
    with journal:
        detectors = Detectors(FaceDetector(cfg.cascade), feature_detector(cfg.cascade))
        bar = tqdm(
            total=len(rows),
            desc="prepare",
            unit="photo",
            disable=not progress,
            initial=len(outcomes),
        )
        with contextlib.closing(_run(todo, out_path, cfg, detectors)) as results:
            for o in results:
                record = _journal_record(o)
                if record is not None:
                    journal.append(record)
                outcomes.append(o)
                bar.update(1)
        bar.close()
        summary = _finish(out_path, sorted(outcomes, key=lambda o: o.index), cfg)
        journal.remove()  # the folder is complete
    if not summary.accepted:
        raise DataError(
            f"{out_path / REJECTED_FILE}: no photo passed the checks ({summary.rejected})"
        )
    return summary


def _finish(out: Path, outcomes: list[Outcome], cfg: PrepareConfig) -> Summary:
    """De-duplicate in row order (the first copy wins), write the four files, prune crops."""
    index = DuplicateIndex(cfg.near_duplicate_bits)
    meta: list[dict[str, Any]] = []
    features: list[tuple[str, dict[str, float | None]]] = []
    rejected: list[dict[str, Any]] = []
    summary = Summary(rows=len(outcomes))
    for o in outcomes:
        summary.reused += o.reused
        if not o.reason:
            dup = index.check(o.sha256, o.dhash)
            if dup is not None:
                o.reason, o.detail = dup[0], f"{o.row.where}: same photo as {dup[1]}"
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
        features.append((o.file_name, o.features or {}))
        summary.accepted += 1
    summary.rejected = dict(Counter(summary.rejected).most_common())
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in meta)
    atomic_write_text(out / METADATA_FILE, lines)
    atomic_write_text(
        out / REJECTED_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)
    )
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2) + "\n")
    if features:
        profile_from_rows(features, cfg.cascade).save(out / PROFILE_FILE)
    else:
        (out / PROFILE_FILE).unlink(missing_ok=True)
    # crops of duplicates and of rows no longer listed go (after metadata.jsonl stops naming them)
    keep = {m["file_name"] for m in meta}
    for f in (out / IMAGES_DIR).iterdir():
        if f"{IMAGES_DIR}/{f.name}" not in keep and f.is_file() and not f.name.startswith("."):
            f.unlink()
    return summary
