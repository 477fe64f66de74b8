"""An append-only journal of finished work, so that a killed run can resume where it stopped.

One JSON object per line. Each line goes to the file in one ``write`` and is fsync'd before
:meth:`Journal.append` returns, so a run killed at any moment (``kill -9``, a lost machine)
keeps every line it had finished. The kill can tear at most the last line: :func:`open_journal`
drops a torn or unreadable line and everything after it, and cuts the file back to the last
good line before appending.

The first line is a header saying what the records are valid for (e.g. the settings they were
made with); a journal whose header differs is discarded and started afresh.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cvgen.fsutil import atomic_write_text


class Journal:
    """An open journal; :meth:`append` records one finished item durably."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line and fsync it."""
        data = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Close and delete the journal (the work it recorded is complete)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(path: Path, header: dict[str, Any]) -> tuple[list[dict[str, Any]], int] | None:
    """(records, bytes of the good prefix) of an existing journal with this header, or None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    header = json.loads(json.dumps(header))  # as it reads back (tuples become lists)
    records: list[dict[str, Any]] = []
    good = 0
    for n, line in enumerate(data.split(b"\n")[:-1]):  # the part after the last \n is torn
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        if n == 0:
            if obj != header:
                return None
        elif isinstance(obj, dict):
            records.append(obj)
        else:
            break
        good += len(line) + 1
    return (records, good) if good else None


def open_journal(
    path: str | os.PathLike[str], header: dict[str, Any]
) -> tuple[Journal, list[dict[str, Any]]]:
    """Open the journal at ``path`` for appending, with the records it already holds.

    A missing journal, or one whose first line is not ``header``, is (re)started empty.
    """
    target = Path(path)
    found = _read(target, header)
    if found is None:
        atomic_write_text(target, json.dumps(header, sort_keys=True) + "\n")
        return Journal(target), []
    records, good = found
    if good < target.stat().st_size:
        os.truncate(target, good)  # drop a torn last line before appending after it
    return Journal(target), records
