"""``cvgen generate``: one img2img image locally, without a server, through the server's code.

The photo goes through the same decoding and framing (:mod:`cvgen.serve.ingress` rules), the
parameters through the same validation (:func:`cvgen.serve.schema.parse_params`) and the model
through the same :class:`cvgen.serve.engine.Img2ImgEngine`, so a seed gives the image the server
gives for it on the same machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cvgen.errors import CVGenError
from cvgen.serve.config import load_config
from cvgen.serve.schema import PARAM_FIELDS


def add_parser(sub: Any) -> None:
    """Register ``cvgen generate``."""
    p = sub.add_parser(
        "generate",
        help="img2img on one photo, without a server",
        description="Generate one image from a photo and a prompt with the serving code path.",
    )
    p.add_argument("--image", required=True, help="input photo")
    p.add_argument("--prompt", required=True, help="what to make of it")
    p.add_argument("--out", required=True, help="output JPEG path (written atomically)")
    p.add_argument("--config", help="serve YAML config for defaults (configs/serve.yaml)")
    p.add_argument("--base", help="base model: diffusers folder or hub id")
    p.add_argument("--lora", help="LoRA file or folder, or wandb://entity/project/artifact:alias")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    p.add_argument("--negative_prompt")
    p.add_argument("--strength", type=float, help="in (0, 1]: how far from the photo to go")
    p.add_argument("--steps", type=int, help="denoising steps (img2img runs steps x strength)")
    p.add_argument("--guidance_scale", type=float, help="classifier-free guidance")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--lora_scale", type=float, help="LoRA strength")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cvgen.images import open_image, save_image_atomic
    from cvgen.serve.engine import GenRequest, Img2ImgEngine, prepare_image
    from cvgen.serve.schema import ClientError, parse_params
    from cvgen.serve.wandb_lora import resolve_lora

    overrides = {k: getattr(args, k) for k in ("base", "lora", "device", "dtype")}
    cfg = load_config(args.config, overrides)
    cfg.lora = resolve_lora(cfg.lora, cfg.wandb_cache_dir)
    fields = {k: getattr(args, k) for k in PARAM_FIELDS if getattr(args, k) is not None}
    has_lora = bool(cfg.lora)
    try:
        params = parse_params(
            fields, cfg, has_lora, cfg.lora_scale if (has_lora and cfg.fuse_lora) else None
        )
    except ClientError as e:
        raise CVGenError(f"--{e}") from None
    photo = open_image(args.image, max_pixels=cfg.max_pixels)
    engine = Img2ImgEngine.load(cfg)
    result = engine.generate([GenRequest(prepare_image(photo, engine.resolution), params)])[0]
    out = Path(args.out)
    save_image_atomic(result.image, out, quality=cfg.jpeg_quality)
    print(f"cvgen: wrote {out} ({result.image.width}x{result.image.height}, seed {params.seed})")
    return 0
