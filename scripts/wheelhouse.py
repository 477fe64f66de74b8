#!/usr/bin/env python
"""Wheels for running cvgen's GPU checks on an offline machine that already has PyTorch.

GPU machines often come as an image with CUDA, torch and a scientific stack but no network.
This collects, from this venv's installed versions, the wheels of what the GPU scripts
(``scripts/bench_gpu.sh``, ``scripts/gpu_train_check.sh``) import beyond torch, for the target
machine's Python and platform, without their dependencies (pip would otherwise pull a CUDA
torch of several GB). torch, torchvision, triton and the NVIDIA libraries stay the target's.

    python scripts/wheelhouse.py --python 3.12 --out .whl      # here, with network
    # on the GPU machine (no network), from the repository root:
    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=$PWD:/tmp/site PY=python3 scripts/bench_gpu.sh
    PYTHONPATH=$PWD:/tmp/site CVGEN="python3 -m cvgen.cli" LOGGER=false \\
        scripts/gpu_train_check.sh

The wheels shadow the target's own copies of the same packages (``--target`` comes first on
``PYTHONPATH``), so the versions are the ones cvgen was tested with.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# what the GPU scripts import: training without streaming or DVC, serving, the CLI
ROOTS = (
    "diffusers",
    "transformers",
    "peft",
    "safetensors",
    "lightning",
    "jsonargparse",
    "docstring-parser",
    "typeshed-client",
    "litserve",
    "python-multipart",
    "prometheus-client",
    "httpx",
    "pyyaml",
    "tqdm",
    "opencv-python-headless",  # serving detects faces (keep_face, framing)
)
# the target's own: torch and what comes with it (numpy and pillow too: other compiled
# packages there are built against its numpy, and an older one shadowing it can break them)
SKIP = re.compile(
    r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|numpy|pillow|setuptools|pip)$"
)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    """name -> installed version, for ``roots`` and everything they require (no extras)."""
    seen: dict[str, str] = {}
    todo = [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or SKIP.match(name):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement this venv does not have
        seen[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            if ";" in req and not _marker_holds(req.split(";", 1)[1]):
                continue
            todo.append(norm(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]))
    return seen


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--python", default="3.12", help="the target machine's Python (X.Y)")
    p.add_argument("--out", default=".whl", help="folder for the wheels")
    p.add_argument("--list", action="store_true", help="print the pins and download nothing")
    args = p.parse_args()
    pins = closure(ROOTS)
    reqs = [f"{n}=={v}" for n, v in sorted(pins.items())]
    if args.list:
        print("\n".join(reqs))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", args.python, "--implementation", "cp", "-d", str(out)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    failed = []
    for req in reqs:  # one at a time: one without a wheel must not stop the others
        if subprocess.run([*cmd, req]).returncode != 0:
            failed.append(req)
    size = sum(f.stat().st_size for f in out.glob("*.whl"))
    print(f"{len(reqs) - len(failed)} wheels, {size / 2**20:.1f} MiB in {out}")
    if failed:
        raise SystemExit(f"no wheel for: {', '.join(failed)}")


if __name__ == "__main__":
    main()
