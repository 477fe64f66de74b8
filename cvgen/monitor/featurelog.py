"""The per-request feature log: what the server keeps about each photo it is sent.

One JSON object per line, one line per request::

    {"v": 1, "time": 1764380000.123, "features": {"brightness": 0.31, ..., "face_x": null}}

``time`` is Unix seconds; ``features`` holds the drift features
(:data:`cvgen.monitor.features.FEATURES`, ``null`` where a photo has none). Nothing else: never
the photo, the prompt, the client's address or any identifier, so the log holds no personal
data beyond these few numbers.

The log is local, append-only and bounded: when writing a line would take the file past
``max_bytes`` it is rotated (``features.jsonl`` -> ``features.jsonl.1`` -> ... ->
``features.jsonl.<backups>``, the oldest dropped), so it never takes more than about
``(backups + 1) * max_bytes`` of disk. Several processes may write one log: each line goes out in
one ``write`` on a file opened for appending, and rotation happens under an exclusive lock
(``fcntl.flock`` on ``.<log>.lock`` beside it). A writer killed mid-line leaves at most one torn line: the
next writer ends it before appending, and :func:`read_feature_log` skips it. Writing never raises: a full disk or a missing folder
costs log lines (counted in :attr:`FeatureLog.errors`, logged once), never a request.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import threading
import time as _time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvgen.errors import CVGenError
from cvgen.monitor.features import FEATURE_NAMES, round_features

LOG_VERSION = 1
DEFAULT_MAX_BYTES = 16 * 2**20
DEFAULT_BACKUPS = 3

log = logging.getLogger(__name__)


class FeatureLog:
    """Appends one line of features per request to a rotating local log.

    Args:
        path: the log file (its folder is created).
        max_bytes: rotate before the file would grow past this.
        backups: rotated files kept (``path.1`` newest ... ``path.<backups>`` oldest).
        enabled: ``False`` turns writing off (the privacy switch); :meth:`write` does nothing.

    Thread- and process-safe; :meth:`write` costs a few tens of microseconds.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        enabled: bool = True,
    ) -> None:
        if max_bytes < 1024:
            raise ValueError(f"max_bytes must be at least 1024, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be >= 0, got {backups}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.enabled = enabled
        self.written = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._lockfile = self.path.with_name(f".{self.path.name}.lock")

    @staticmethod
    def line(features: Mapping[str, float], when: float | None = None) -> bytes:
        """The log line (with its newline) of one request's ``features`` at ``when``."""
        record = {
            "v": LOG_VERSION,
            "time": round(_time.time() if when is None else when, 3),
            "features": round_features(features),
        }
        return (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")

    def write(self, features: Mapping[str, float], when: float | None = None) -> bool:
        """Append one request's features; ``False`` (and counted in ``errors``) if it failed."""
        if not self.enabled:
            return False
        data = self.line(features, when)
        try:
            with self._lock, self._locked():
                size = self.path.stat().st_size if self.path.exists() else 0
                if size and size + len(data) > self.max_bytes:
                    self._rotate()
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    end = os.fstat(fd).st_size
                    if end and os.pread(fd, 1, end - 1) != b"\n":
                        data = b"\n" + data  # end a line torn by a killed writer first
                    os.write(fd, data)
                finally:
                    os.close(fd)
        except OSError as e:
            self.errors += 1
            if self.errors == 1:
                log.warning(
                    "feature log %s: cannot write (%s); further errors are counted", self.path, e
                )
            return False
        self.written += 1
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lockfile, os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _rotate(self) -> None:
        if self.backups == 0:
            os.truncate(self.path, 0)
            return
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


@dataclass
class LogRecords:
    """What :func:`read_feature_log` found: records oldest first, the files read, lines skipped."""

    times: list[float] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: int = 0


def log_files(path: str | os.PathLike[str]) -> list[Path]:
    """A log and its rotated files, oldest first (``path.3``, ``path.2``, ``path.1``, ``path``).

    Given a rotated file (``features.jsonl.2``) it reads the whole log it belongs to.
    """
    p = Path(path)
    m = re.fullmatch(r"(.+)\.(\d+)", p.name)
    base = p.with_name(m.group(1)) if m else p
    rotated = sorted(
        (int(f.name[len(base.name) + 1 :]), f)
        for f in base.parent.glob(glob.escape(base.name) + ".*")
        if f.name[len(base.name) + 1 :].isdigit() and f.is_file()
    )
    files = [f for _, f in reversed(rotated)] + ([base] if base.is_file() else [])
    if not files:
        raise CVGenError(f"{p}: no such file (a feature log)")
    return files


def _record(obj: Any) -> tuple[float, dict[str, float]] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("features"), dict):
        return None
    when = obj.get("time")
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        return None
    feats = obj["features"]
    row: dict[str, float] = {}
    for name in FEATURE_NAMES:
        v = feats.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return None
        row[name] = math.nan if v is None else float(v)
    return float(when), row


def read_feature_log(path: str | os.PathLike[str], last: int | None = None) -> LogRecords:
    """The records of a feature log and its rotated files, oldest first.

    Lines that are not records (a line torn by a killed writer, an unknown shape) are skipped
    and counted; a log with no record at all is an error naming the file and its first line.
    ``last``: keep only the newest ``last`` records.
    """
    out = LogRecords(files=log_files(path))
    first_bad = ""
    for f in out.files:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = _record(json.loads(raw))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    rec = None
                if rec is None:
                    out.skipped += 1
                    first_bad = first_bad or f"{f}:{lineno}"
                    continue
                out.times.append(rec[0])
                out.rows.append(rec[1])
    if not out.rows:
        where = first_bad or str(out.files[-1])
        raise CVGenError(
            f"{where}: no feature records in {', '.join(map(str, out.files))} "
            '(expected JSON lines like {"v": 1, "time": ..., "features": {...}})'
        )
    if last is not None and last < len(out.rows):
        out.times, out.rows = out.times[-last:], out.rows[-last:]
    return out
