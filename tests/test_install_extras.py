"""The base install (no ``cvgen[train]``) builds models, generates and serves; the training
commands then fail with one line that names the extra.

The training packages are hidden from a subprocess (and from the server's worker processes)
by a ``sitecustomize`` that marks them absent in ``sys.modules``: ``import`` then raises
``ModuleNotFoundError`` and ``importlib.util.find_spec`` returns None, as when they are not
installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cvgen.cli import TRAIN_PACKAGES

HIDE = f"""
import sys
for name in {sorted(TRAIN_PACKAGES)!r}:
    sys.modules[name] = None
"""

SCRIPT = """
import io, sys, time
from pathlib import Path
from PIL import Image
from cvgen.cli import TRAIN_PACKAGES, main

tmp = Path(sys.argv[1])
assert main(["model", "random", "--arch", "tiny", "--out", str(tmp / "tiny")]) == 0
face = tmp / "face.jpg"  # a sample portrait, written by the test (its packages are hidden here)
argv = ["generate", "--image", str(face), "--look", "corporate", "--framing", "4:5", "--out",
        str(tmp / "out.jpg"), "--base", str(tmp / "tiny"), "--device", "cpu", "--steps", "2"]
assert main(argv) == 0 and Image.open(tmp / "out.jpg").size == (52, 64)  # the face kept

from fastapi.testclient import TestClient
from litserve.utils import wrap_litserve_start
from cvgen.serve.config import ServeConfig
from cvgen.serve.server import build_server

cfg = ServeConfig(base=str(tmp / "tiny"), device="cpu", default_steps=2, max_steps=4)
with wrap_litserve_start(build_server(cfg, api_key=None)) as s, TestClient(s.app) as c:
    for _ in range(600):
        if c.get("/health").status_code == 200:
            break
        time.sleep(0.1)
    r = c.post("/predict", data={"prompt": "portrait", "seed": "1", "keep_face": "true"},
               files={"image": ("in.jpg", face.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (64, 64) and r.headers["x-face-box"]

for command in (["fit", "--help"], ["data", "sample", "--out", str(tmp / "d")]):
    assert main(command) == 2, command
loaded = sorted(n for n in TRAIN_PACKAGES if sys.modules.get(n) is not None)
assert not loaded, loaded
print("BASE-INSTALL-OK")
"""


def test_serve_and_generate_need_no_training_packages(
    tmp_path: Path, portraits: dict[str, bytes]
) -> None:
    """The serving install frames photos and keeps faces: OpenCV's detector is in it."""
    assert "cv2" not in TRAIN_PACKAGES
    (tmp_path / "face.jpg").write_bytes(portraits["hopper"])
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE)
    path = os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert "BASE-INSTALL-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    # the training commands fail with one line naming the extra, not a traceback
    for cmd in ("fit", "data"):
        line = f"'cvgen {cmd}' needs the training dependencies"
        assert line in proc.stderr and "pip install 'cvgen[train]'" in proc.stderr
    assert "Traceback" not in proc.stderr
