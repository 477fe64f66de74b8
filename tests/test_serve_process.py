"""A real ``cvgen serve`` process on 127.0.0.1: health, a request, then SIGTERM mid-request.

Every process the server starts inherits a unique environment tag; after SIGTERM none may be
left (LitServe alone would orphan its workers).
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment holds ``CVGEN_TEST_TAG=tag``."""
    needle = f"CVGEN_TEST_TAG={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_serve_process_health_request_and_clean_sigterm(tiny_model: Path, tmp_path: Path) -> None:
    port, tag, key = free_port(), uuid.uuid4().hex, "process-key"
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        f"base: {tiny_model}\ndevice: cpu\ndefault_steps: 2\nmax_steps: 8\nshutdown_grace: 30\n"
    )
    env = {**os.environ, "CVGEN_TEST_TAG": tag, "CVGEN_API_KEY": key, "PORT": str(port)}
    cmd = [sys.executable, "-m", "cvgen.cli", "serve", "--config", str(cfg), "--host", "127.0.0.1"]
    log = tmp_path / "server.log"  # a file, not a pipe: a full pipe would block the server
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    buf = io.BytesIO()
    Image.new("RGB", (80, 100), (30, 120, 200)).save(buf, format="JPEG")
    files = {"image": ("p.jpg", buf.getvalue(), "image/jpeg")}
    headers = {"X-API-Key": key}
    try:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            for _ in range(600):  # bounded: at most ~2 minutes to load
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            else:
                pytest.fail("the server never became healthy")
            r = c.post(
                "/predict", data={"prompt": "portrait", "seed": "1"}, files=files, headers=headers
            )
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            assert Image.open(io.BytesIO(r.content)).size == (64, 64)
            assert c.post("/predict", data={"prompt": "portrait"}, files=files).status_code == 401

            # a slow request in flight when SIGTERM arrives must still be answered
            answer: dict[str, Any] = {}

            def slow() -> None:
                data = {"prompt": "portrait", "steps": "8", "strength": "1"}
                answer["r"] = c.post("/predict", data=data, files=files, headers=headers)

            t = threading.Thread(target=slow)
            t.start()
            for _ in range(200):  # until /metrics shows it in flight (besides the scrape)
                text = c.get("/metrics", headers=headers).text
                m = re.search(r"^cvgen_http_requests_in_flight (\S+)$", text, re.M)
                if m and float(m.group(1)) >= 2:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the slow request never showed as in flight")
            proc.send_signal(signal.SIGTERM)
            t.join(timeout=60)
            assert answer["r"].status_code == 200
            assert Image.open(io.BytesIO(answer["r"].content)).size == (64, 64)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for _ in range(50):  # the reaped group may take a moment to vanish from /proc
        left = tagged_pids(tag)
        if not left:
            break
        time.sleep(0.1)
    assert left == [], f"processes left behind: {left}"
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if '"event": "request"' in ln]
    assert lines and key not in text  # JSON access lines, no key
    # the inference worker's own lines reach the output, and one line says the server is up
    for what in ("model loaded: base=", "speed levers: ", "warm-up: batch sizes"):
        assert what in text, what
    ready = (
        f"cvgen: serving {tiny_model} on http://127.0.0.1:{port} (POST /predict; /health, /metrics)"
    )
    assert text.count(ready) == 1, text[-3000:]


def test_serve_with_a_mistyped_base_fails_in_one_line(tmp_path: Path) -> None:
    """A base that is neither a folder nor a cached hub model: one line, before any worker."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    cmd = [sys.executable, "-m", "cvgen.cli", "serve", "--base", "models/tny"]
    proc = subprocess.run(
        [*cmd, "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("cvgen: error: base model 'models/tny': no such folder")
    assert "not a hub model in the Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
