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


def wait_healthy(client: httpx.Client, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``/health`` answers 200 (at most ~2 minutes to load); fails with the server's
    output if it exits first."""
    for _ in range(600):
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail("the server never became healthy")


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


def test_serve_process_health_request_and_clean_sigterm(
    tiny_model: Path, tmp_path: Path, portraits: dict[str, bytes]
) -> None:
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
    files = {"image": ("p.jpg", portraits["collins"], "image/jpeg")}  # keep_face by default
    headers = {"X-API-Key": key}
    try:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            wait_healthy(c, proc, log)
            r = c.post(
                "/predict", data={"prompt": "portrait", "seed": "1"}, files=files, headers=headers
            )
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            assert Image.open(io.BytesIO(r.content)).size == (64, 64)
            assert re.fullmatch(r"\d+,\d+,\d+,\d+", r.headers["x-face-box"])
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
        f"cvgen: serving {tiny_model} on http://127.0.0.1:{port} "
        "(page /, POST /predict; /looks, /loras, /info, /health, /metrics, /docs)"
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


def _serve_error(args: list[str], cwd: Path) -> str:
    """The one line ``cvgen serve`` fails with, before any worker starts."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "cvgen.cli", "serve", *args, "--port", str(free_port())]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_serve_checks_every_lora_and_the_looks_file_first(
    tiny_model: Path, two_loras: dict[str, Path], tmp_path: Path
) -> None:
    from cvgen.modelzoo import save_random_model

    from .conftest import make_random_lora

    small = save_random_model(tmp_path / "small", "small", seed=0)
    other = make_random_lora(small, tmp_path / "other")  # made for another base
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        f"base: {tiny_model}\nloras:\n  grey: {two_loras['grey']}\n  odd: {other.parent}\n"
    )
    line = _serve_error(["--config", str(cfg)], tmp_path)
    assert line.startswith(f"cvgen: error: loras.odd: LoRA {other.parent} does not fit"), line
    looks = tmp_path / "looks.yaml"
    looks.write_text("corporate:\n  description: d\n  prompt: p\n  strength: 2\n")
    cfg.write_text(f"base: {tiny_model}\nlooks: {looks}\n")
    line = _serve_error(["--config", str(cfg)], tmp_path)
    assert line == f"cvgen: error: {looks}:4: corporate.strength must be <= 1.0, got 2", line
    cfg.write_text(f"base: {tiny_model}\nloras:\n  grey: {two_loras['grey']}\n")
    line = _serve_error(["--config", str(cfg), "--lora", str(two_loras["warm"])], tmp_path)
    assert line.startswith("cvgen: error: --lora: lora and loras are both set"), line
