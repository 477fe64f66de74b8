"""The server's per-request feature log: what a line holds (and does not), rotation within its
size bound, several writer processes at once, a writer killed with SIGKILL, and the reader that
takes a log with its rotated files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvgen.errors import CVGenError
from cvgen.monitor.featurelog import FeatureLog, log_files, read_feature_log
from cvgen.monitor.features import FEATURE_NAMES


def _features(i: int) -> dict[str, float]:
    f = {name: float(i) + k / 10 for k, name in enumerate(FEATURE_NAMES)}
    f["face_x"] = math.nan
    return f


def test_a_line_holds_the_time_and_the_features_only(tmp_path: Path) -> None:
    log = FeatureLog(tmp_path / "logs" / "features.jsonl")
    assert log.write({**_features(1), "prompt": "secret"}, when=1700000000.12345)  # type: ignore[dict-item]
    (line,) = (tmp_path / "logs" / "features.jsonl").read_text().splitlines()
    obj = json.loads(line)
    assert obj == {
        "v": 1,
        "time": 1700000000.123,
        "features": {**{k: round(v, 6) for k, v in _features(1).items()}, "face_x": None},
    }
    assert "secret" not in line and "prompt" not in line
    recs = read_feature_log(tmp_path / "logs" / "features.jsonl")
    assert recs.times == [1700000000.123] and recs.skipped == 0
    assert math.isnan(recs.rows[0]["face_x"]) and recs.rows[0]["brightness"] == 1.0


def test_a_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = FeatureLog(tmp_path / "features.jsonl", enabled=False)
    assert not log.write(_features(1))
    assert not list(tmp_path.iterdir())


def test_rotation_keeps_the_log_within_its_bound_and_the_newest_records(tmp_path: Path) -> None:
    path = tmp_path / "features.jsonl"
    log = FeatureLog(path, max_bytes=4096, backups=2)
    n = 200
    for i in range(n):
        assert log.write(_features(i), when=1000.0 + i)
    files = log_files(path)
    assert [f.name for f in files] == ["features.jsonl.2", "features.jsonl.1", "features.jsonl"]
    assert all(f.stat().st_size <= 4096 for f in files)
    recs = read_feature_log(path)
    # oldest first, contiguous, ending with the last one written; the oldest were dropped
    assert recs.times == [1000.0 + i for i in range(n - len(recs.times), n)]
    longest = max(len(FeatureLog.line(_features(i), 1000.0 + i)) for i in range(n))
    assert 2 * (4096 // longest) <= len(recs.times) < n  # the two backups are full
    # a rotated file names the whole log; --last keeps the newest
    assert read_feature_log(tmp_path / "features.jsonl.2").times == recs.times
    assert read_feature_log(path, last=5).times == recs.times[-5:]


def test_no_backups_truncates(tmp_path: Path) -> None:
    log = FeatureLog(tmp_path / "f.jsonl", max_bytes=2048, backups=0)
    for i in range(100):
        log.write(_features(i))
    assert [f.name for f in log_files(tmp_path / "f.jsonl")] == ["f.jsonl"]
    assert (tmp_path / "f.jsonl").stat().st_size <= 2048


def test_write_failures_are_counted_never_raised(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    log = FeatureLog(tmp_path / "file" / "features.jsonl")  # its folder is a file
    assert not log.write(_features(1)) and not log.write(_features(2))
    assert (log.errors, log.written) == (2, 0)
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureLog(tmp_path / "x", max_bytes=10)


def test_reader_skips_torn_and_foreign_lines_and_refuses_a_file_without_records(
    tmp_path: Path,
) -> None:
    path = tmp_path / "features.jsonl"
    log = FeatureLog(path)
    log.write(_features(1), when=1.0)
    with open(path, "ab") as fh:
        fh.write(b'{"v": 1, "time": 2.0, "features": {"bright')  # torn by a kill ...
    log.write(_features(3), when=3.0)  # ... and appended after
    with open(path, "ab") as fh:
        fh.write(b'{"v": 1, "time": 4.0, "features": {"brightness": "dark"}}\n')
    recs = read_feature_log(path)
    assert recs.times == [1.0, 3.0] and recs.skipped == 2
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(CVGenError, match=r"other\.csv:1: no feature records"):
        read_feature_log(other)
    with pytest.raises(CVGenError, match="no such file"):
        read_feature_log(tmp_path / "missing.jsonl")


WRITER = """
import sys, time
from cvgen.monitor.featurelog import FeatureLog
from cvgen.monitor.features import FEATURE_NAMES
path, worker, count, max_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = FeatureLog(path, max_bytes=max_bytes, backups=3)
print("ready", flush=True)
i = 0
while count < 0 or i < count:
    log.write({n: float(i) for n in FEATURE_NAMES}, when=worker * 1e6 + i)
    i += 1
    if count < 0 and i % 50 == 0:
        print(i, flush=True)
"""


def _writer(path: Path, worker: int, count: int, max_bytes: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(worker), str(count), str(max_bytes)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_several_processes_write_one_log_without_tearing_a_line(tmp_path: Path) -> None:
    path = tmp_path / "features.jsonl"
    procs = [_writer(path, w, 300, 64 * 1024) for w in range(3)]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    recs = read_feature_log(path)
    assert recs.skipped == 0
    # everything written is there (the bound was not reached) and in each writer's order
    assert len(recs.times) == 900
    for w in range(3):
        mine = [t - w * 1e6 for t in recs.times if w * 1e6 <= t < (w + 1) * 1e6]
        assert mine == [float(i) for i in range(300)]
    # now with rotation racing between the writers
    small = tmp_path / "small.jsonl"
    procs = [_writer(small, w, 300, 8192) for w in range(3)]
    for p in procs:
        p.communicate(timeout=120)
    recs = read_feature_log(small)
    assert recs.skipped == 0 and all(f.stat().st_size <= 8192 for f in log_files(small))
    assert len(log_files(small)) == 4


def test_a_writer_killed_mid_run_leaves_a_readable_log(tmp_path: Path) -> None:
    path = tmp_path / "features.jsonl"
    proc = _writer(path, 0, -1, 1 << 20)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while int(proc.stdout.readline() or 0) < 200:  # at least 200 lines written
        assert time.monotonic() < deadline
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    recs = read_feature_log(path)
    assert recs.skipped <= 1 and len(recs.times) >= 200
    assert recs.times == [float(i) for i in range(len(recs.times))]
    # a new writer appends after whatever the killed one left
    FeatureLog(path).write(_features(0), when=5e6)
    assert read_feature_log(path).times[-1] == 5e6
