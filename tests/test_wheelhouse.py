"""scripts/wheelhouse.py pins what the GPU scripts import, at this venv's versions, and leaves
torch, its CUDA libraries and numpy to the target machine (no download here: ``--list``)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheelhouse_lists_cvgen_runtime_pins_without_torch() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "wheelhouse.py"), "--list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    pins = dict(line.split("==") for line in out)
    for name in ("diffusers", "transformers", "tokenizers", "peft", "litserve", "jsonargparse"):
        assert pins[name] == metadata.version(name), name
    assert "fastapi" in pins and "huggingface-hub" in pins  # dependencies are followed
    assert not {"torch", "torchvision", "triton"} & set(pins)
    assert not {n for n in pins if n.startswith("nvidia-")}
    assert "numpy" not in pins and "pillow" not in pins
    # the training-data packages are not needed by the GPU scripts; serving's face detector is
    assert not {"dvc", "litdata", "wandb"} & set(pins)
    assert pins["opencv-python-headless"] == metadata.version("opencv-python-headless")
