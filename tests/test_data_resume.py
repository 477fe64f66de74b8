"""Resuming ``cvgen data prepare``: the journal itself, and a run killed with SIGKILL mid-run
and run again, which redoes only the rows that were in flight and ends with a folder that is
byte for byte an uninterrupted run's.

The photos come from a local HTTP server that serves the first requests and then holds every
further one until the test opens a gate, so the kill lands at a known point: all workers
waiting on a photo, every earlier row finished."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from cvgen.data.journal import open_journal
from cvgen.data.prepare import JOURNAL_FILE, PrepareConfig, journal_header, output_name, prepare
from cvgen.data.sample import write_sample_set
from cvgen.data.sources import read_source

WORKERS = 4
SERVED_BEFORE_GATE = 12
FAILING = ["missing", "page.html", "busy"]  # 404 (final), not an image (final), 503 (transient)


class _GatedHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:  # type: ignore[attr-defined]
            srv.hits.append(self.path)  # type: ignore[attr-defined]
            held = len(srv.hits) > SERVED_BEFORE_GATE and not srv.gate.is_set()  # type: ignore[attr-defined]
            srv.held += held  # type: ignore[attr-defined]
        if held:
            srv.gate.wait(60)  # type: ignore[attr-defined]
        name = self.path.lstrip("/")
        if name == "missing":
            self._send(404, "text/plain", b"not found")
        elif name == "page.html":
            self._send(200, "text/html", b"<html>not a photo</html>")
        elif name == "busy":
            self._send(503, "text/plain", b"try later")
        else:
            self._send(200, "image/jpeg", srv.photos[name])  # type: ignore[attr-defined]

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the killed client is gone
            pass


def _photos(tmp: Path) -> dict[str, bytes]:
    """24 different JPEGs: the 8 sample portraits, each at three qualities."""
    raw = write_sample_set(tmp / "sample", size=256)
    out = {}
    for path in sorted((raw / "images").glob("*.jpg")):
        img = Image.open(path).convert("RGB")
        for q in (80, 88, 95):
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=q)
            out[f"{path.stem}-q{q}.jpg"] = buf.getvalue()
    return out


@pytest.fixture()
def gated(tmp_path: Path) -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _GatedHandler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()  # type: ignore[attr-defined]
    srv.hits = []  # type: ignore[attr-defined]
    srv.held = 0  # type: ignore[attr-defined]
    srv.gate = threading.Event()  # type: ignore[attr-defined]
    srv.photos = _photos(tmp_path)  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.gate.set()  # type: ignore[attr-defined]
    srv.shutdown()
    srv.server_close()


def _command(listing: Path, out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "cvgen.cli", "data", "prepare"),
        *("--src", str(listing), "--out", str(out), "--no-progress"),
        *("--resolution", "64", "--min-size", "64", "--workers", str(WORKERS)),
        *("--retries", "0", "--timeout", "60", "--allow-network", "127.0.0.0/8"),
    ]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _journalled(out: Path) -> list[dict[str, object]]:
    lines = (out / JOURNAL_FILE).read_bytes().split(b"\n")
    return [json.loads(x) for x in lines[1:] if x]


def test_sigkill_then_rerun_redoes_only_rows_in_flight(
    gated: ThreadingHTTPServer, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{gated.server_address[1]}"
    names = [*FAILING, *gated.photos]  # type: ignore[attr-defined]
    listing = tmp_path / "urls.jsonl"
    listing.write_text(
        "".join(
            json.dumps({"url": f"{base}/{n}", "caption": f"portrait {n}"}) + "\n" for n in names
        )
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # 1. run until every worker waits at the gate, then SIGKILL
    proc = subprocess.Popen(
        _command(listing, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 180
        while gated.held < WORKERS:  # type: ignore[attr-defined]
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "prepare never reached the gate"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metadata.jsonl").exists()  # it really stopped mid-run
    first = list(gated.hits)  # type: ignore[attr-defined]
    assert len(first) == SERVED_BEFORE_GATE + WORKERS
    served = {p.lstrip("/") for p in first[:SERVED_BEFORE_GATE]}
    # every served row is in the journal except the transient 503, which is retried later
    journalled = _journalled(out)
    assert len(journalled) == len(served - {"busy"})
    # a kill can tear the last line (on power loss); the re-run must shrug it off
    with open(out / JOURNAL_FILE, "ab") as fh:
        fh.write(b'{"name": "images/torn')

    # 2. the same command again, the gate open: only unjournalled rows are fetched
    gated.gate.set()  # type: ignore[attr-defined]
    before = len(gated.hits)  # type: ignore[attr-defined]
    res = subprocess.run(
        _command(listing, out), env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    second = [p.lstrip("/") for p in gated.hits[before:]]  # type: ignore[attr-defined]
    assert len(second) == len(set(second)) == len(names) - len(journalled)
    assert not set(second) & (served - {"busy"})  # nothing journalled is fetched again
    redone = {p.lstrip("/") for p in first} & set(second)
    assert len(redone - {"busy"}) <= WORKERS  # only the rows in flight at the kill
    assert f"({len(journalled)} already done)" in res.stdout
    assert not (out / JOURNAL_FILE).exists()

    # 3. an uninterrupted run gives the same folder, byte for byte
    ref = tmp_path / "ref"
    res = subprocess.run(
        _command(listing, ref), env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    got, want = _files(out), _files(ref)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    summary = json.loads(want["summary.json"])
    assert summary["rows"] == len(names) and summary["accepted"] >= 8
    assert summary["rejected"]["http_404"] == 1 and summary["rejected"]["http_503"] == 1


def test_journal_drops_a_torn_last_line_and_appends_after_the_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    header = {"journal": "test", "settings": {"sizes": (1, 2)}}
    journal, records = open_journal(path, header)
    assert records == []
    journal.append({"n": 1})
    journal.append({"n": 2})
    journal.close()
    with open(path, "ab") as fh:  # killed in the middle of a line
        fh.write(b'{"n": 3, "na')
    journal, records = open_journal(path, header)
    assert records == [{"n": 1}, {"n": 2}]
    journal.append({"n": 4})
    journal.close()
    assert open_journal(path, header)[1] == [{"n": 1}, {"n": 2}, {"n": 4}]
    # a journal written under other settings starts again empty
    other = {"journal": "test", "settings": {"sizes": [1, 3]}}
    assert open_journal(path, other)[1] == []
    assert path.read_text().splitlines() == [json.dumps(other, sort_keys=True)]


def test_prepare_reuses_journalled_rows_only_under_the_same_settings(tmp_path: Path) -> None:
    raw = write_sample_set(tmp_path / "raw", size=256)
    cfg = PrepareConfig(resolution=64, min_size=64, workers=2)
    first = read_source(raw)[0]
    out = tmp_path / "out"
    out.mkdir()

    def journal_says_no_face(header: dict[str, object]) -> None:
        journal, _ = open_journal(out / JOURNAL_FILE, header)
        record = {"name": output_name(first, cfg), "where": first.where, "reason": "no_face"}
        journal.append({**record, "detail": "from the journal"})
        journal.close()

    journal_says_no_face(journal_header(cfg))
    s = prepare(raw, out, cfg, progress=False)
    assert (s.reused, s.accepted, s.rejected) == (1, 7, {"no_face": 1})
    assert "from the journal" in (out / "rejected.jsonl").read_text()
    assert not (out / JOURNAL_FILE).exists()
    # the journal of a run with another minimum size decides nothing here
    journal_says_no_face(journal_header(dataclasses.replace(cfg, min_size=32)))
    s = prepare(raw, tmp_path / "out", cfg, progress=False)
    assert s.rejected == {} and s.accepted == 8
