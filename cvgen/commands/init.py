"""``cvgen init DIR``: a working folder with the shipped configs, for installs without the repo.

``pip install "cvgen[train]"`` brings the configs inside the package (``cvgen/configs``); this
command copies them into ``DIR/configs/`` so that, in ``DIR``, the README's commands work as
written::

    cvgen model random --arch tiny --out models/tiny
    cvgen data sample --out data/sample
    cvgen fit --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

from cvgen.errors import CVGenError
from cvgen.fsutil import atomic_write_bytes

NEXT_STEPS = """\
next, in {dir}:
  cvgen model random --arch tiny --out models/tiny     # the tiny random SD model (offline)
  cvgen data sample --out data/sample                  # the embedded sample portraits
  cvgen fit --config configs/demo.yaml                 # train the demo LoRA on the CPU
  cvgen serve --config configs/serve.yaml              # serve it (add --lora runs/demo/lora)"""


def shipped_configs() -> dict[str, bytes]:
    """The configs inside the installed package, by file name."""
    folder = resources.files("cvgen") / "configs"
    return {
        entry.name: entry.read_bytes()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yaml")
    }


def init_dir(target: str | Path, force: bool = False) -> list[Path]:
    """Write the shipped configs into ``target/configs``; returns the files written.

    An existing file with other content is left alone (an error naming it) unless ``force``.
    """
    configs = shipped_configs()
    if not configs:
        raise CVGenError("this cvgen install ships no configs (cvgen/configs is empty)")
    out = Path(target) / "configs"
    clashes = [
        out / name
        for name, data in configs.items()
        if (out / name).exists() and (out / name).read_bytes() != data
    ]
    if clashes and not force:
        raise CVGenError(
            f"{clashes[0]} exists and differs from the shipped config; "
            "move it away or pass --force to overwrite"
        )
    written = []
    for name, data in configs.items():
        atomic_write_bytes(out / name, data)
        written.append(out / name)
    return written


def add_parser(sub: Any) -> None:
    """Register ``cvgen init``."""
    p = sub.add_parser(
        "init",
        help="write the shipped configs into a working folder",
        description="Copy the configs that ship with cvgen (demo, lora, serve) into "
        "DIR/configs/, so the README's commands run in DIR without the repository.",
    )
    p.add_argument("dir", nargs="?", default=".", help="working folder (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite configs that differ")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    written = init_dir(args.dir, force=args.force)
    print(f"cvgen: wrote {', '.join(str(p) for p in written)}")
    print(NEXT_STEPS.format(dir=args.dir))
    return 0
