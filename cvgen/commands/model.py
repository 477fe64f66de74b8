"""``cvgen model``: build models."""

from __future__ import annotations

import argparse
from typing import Any

from cvgen.modelzoo import ARCHS


def add_parser(sub: Any) -> None:
    p = sub.add_parser("model", help="build models")
    msub = p.add_subparsers(dest="model_command", required=True)
    r = msub.add_parser(
        "random",
        help="write a randomly initialised SD model as a diffusers folder",
        description="Write a randomly initialised Stable Diffusion model (SD 1.5 classes) as a "
        "normal diffusers folder. 'tiny' trains on a CPU in seconds; 'sd15' has the full SD 1.5 "
        "architecture (random weights: for GPU checks and benchmarks).",
    )
    r.add_argument("--arch", choices=ARCHS, default="tiny", help="model size (default: tiny)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--seed", type=int, default=0, help="weights are a function of the seed")
    r.set_defaults(func=_random)


def _random(args: argparse.Namespace) -> int:
    from cvgen.modelzoo import save_random_model

    path = save_random_model(args.out, args.arch, args.seed)
    print(f"cvgen: wrote a random {args.arch} Stable Diffusion model to {path}")
    return 0
