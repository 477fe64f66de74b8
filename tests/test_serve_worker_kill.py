"""A real ``cvgen serve`` whose inference worker is killed with SIGKILL mid-request.

The request in the dead worker is answered 503 ``{"detail", "field"}`` at once (never a hang),
``/health`` turns 503 and new requests are refused with 503 while the worker is restarted,
then the server serves again; SIGTERM then leaves no process behind. With
``restart_workers: false`` the server exits 1 instead (for its supervisor to restart it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .test_serve_process import free_port, tagged_pids

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
KEY = "kill-key"
H = {"X-API-Key": KEY}


def inference_workers(supervisor: int) -> list[Any]:
    """The server's inference workers: the processes LitServe spawns (a fresh interpreter
    running ``spawn_main``); its API server and manager are forks, with the parent's command."""
    found = []
    for p in psutil.Process(supervisor).children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


@contextmanager
def serve(tiny_model: Path, tmp_path: Path, extra: str = "") -> Iterator[tuple[Any, str, Path]]:
    """A ``cvgen serve`` process (tagged, so that leftovers can be found) once it is healthy."""
    port, tag = free_port(), uuid.uuid4().hex
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        f"base: {tiny_model}\ndevice: cpu\ndefault_steps: 2\nmax_steps: 400\nwarmup: false\n"
        f"default_keep_face: false\nshutdown_grace: 10\n{extra}"
    )
    env = {**os.environ, "CVGEN_TEST_TAG": tag, "CVGEN_API_KEY": KEY, "PORT": str(port)}
    cmd = [sys.executable, "-m", "cvgen.cli", "serve", "--config", str(cfg), "--host", "127.0.0.1"]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as c:
            health_until(c, proc, log, 200)
            proc.client = c  # type: ignore[attr-defined]
            yield proc, tag, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def health_until(c: httpx.Client, proc: Any, log: Path, code: int, limit: float = 180) -> float:
    """Seconds until ``/health`` answers ``code`` (bounded)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if c.get("/health").status_code == code:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"/health never answered {code}: {log.read_text(errors='replace')[-3000:]}")


def photo() -> dict[str, Any]:
    from .test_serve import PHOTO

    return {"image": ("p.jpg", PHOTO, "image/jpeg")}


def slow_request_in_worker(c: httpx.Client) -> tuple[threading.Thread, dict[str, Any]]:
    """A long request, started and waited for until the worker has taken it from the queue."""
    answer: dict[str, Any] = {}

    def send() -> None:
        data = {"prompt": "portrait", "steps": "400", "strength": "1", "seed": "1"}
        t0 = time.monotonic()
        answer["r"] = c.post("/predict", data=data, files=photo(), headers=H)
        answer["at"] = time.monotonic()
        answer["took"] = answer["at"] - t0

    t = threading.Thread(target=send)
    t.start()
    for _ in range(400):
        text = c.get("/metrics", headers=H).text
        if "cvgen_http_requests_in_flight 2.0" in text and "cvgen_queue_depth 0.0" in text:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the slow request never reached the worker")
    time.sleep(0.5)  # well into the pipeline call
    return t, answer


def no_leftovers(tag: str) -> None:
    for _ in range(100):
        left = tagged_pids(tag)
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes left behind: {left}")


def test_a_killed_worker_answers_503_is_restarted_and_leaves_nothing_behind(
    tiny_model: Path, tmp_path: Path
) -> None:
    with serve(tiny_model, tmp_path) as (proc, tag, log):
        c = proc.client
        [worker] = inference_workers(proc.pid)
        t, answer = slow_request_in_worker(c)
        killed_at = time.monotonic()
        worker.send_signal(signal.SIGKILL)
        t.join(timeout=30)
        assert not t.is_alive(), "the request in the killed worker hangs"
        r = answer["r"]
        assert r.status_code == 503 and r.headers["retry-after"] == "10"
        body = r.json()
        assert set(body) == {"detail", "field"} and body["field"] is None
        assert body["detail"].startswith("the inference worker 0 died while making this image")
        answered_after = answer["at"] - killed_at

        assert c.get("/health").status_code == 503  # the new worker is loading the model
        refused = c.post("/predict", data={"prompt": "p"}, files=photo(), headers=H)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "10"
        assert "no inference worker is ready" in refused.json()["detail"]
        back_after = health_until(c, proc, log, 200) + (time.monotonic() - killed_at)
        [new] = inference_workers(proc.pid)
        assert new.pid != worker.pid and not psutil.pid_exists(worker.pid)

        ok = c.post("/predict", data={"prompt": "portrait"}, files=photo(), headers=H)
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
        text = c.get("/metrics", headers=H).text
        assert "cvgen_worker_restarts_total 1.0" in text
        assert 'cvgen_worker_up{worker="0"} 1.0' in text
        assert 'cvgen_http_requests_total{method="POST",path="/predict",status="503"} 2.0' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    no_leftovers(tag)
    text = log.read_text(errors="replace")
    assert "inference worker 0 (pid" in text and "exited with code -9; restarting it" in text
    print(
        f"killed worker: answered 503 after {answered_after:.2f} s, serving again after {back_after:.1f} s"
    )


@pytest.mark.slow
def test_without_restarts_a_killed_worker_stops_the_server(
    tiny_model: Path, tmp_path: Path
) -> None:
    with serve(tiny_model, tmp_path, "restart_workers: false\n") as (proc, tag, log):
        c = proc.client
        [worker] = inference_workers(proc.pid)
        t, answer = slow_request_in_worker(c)
        worker.send_signal(signal.SIGKILL)
        t.join(timeout=30)
        assert answer["r"].status_code == 503
        assert "stopping" in answer["r"].json()["detail"] or "died" in answer["r"].json()["detail"]
        assert proc.wait(timeout=60) == 1  # for the supervisor (Cloud Run) to restart it
    no_leftovers(tag)
    assert "restart_workers is false: stopping the server (exit code 1)" in log.read_text()
