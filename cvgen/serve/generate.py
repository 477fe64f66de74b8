"""``cvgen generate``: one img2img image locally, without a server, through the server's code.

The photo goes through the same decoding and framing (:func:`cvgen.serve.schema.decode_photo`),
the parameters through the same validation (:meth:`cvgen.serve.schema.GenParams.parse`) and the
model through the same :class:`cvgen.serve.engine.Img2ImgEngine`, so a seed gives the image the
server gives for it on the same machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cvgen.errors import CVGenError
from cvgen.serve.config import load_config
from cvgen.serve.schema import GenParams


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
    """Validate like the server, load the engine, write one image."""
    from cvgen.images import save_image_atomic
    from cvgen.serve.engine import Img2ImgEngine
    from cvgen.serve.schema import ClientError, GenRequest, decode_photo
    from cvgen.serve.wandb_lora import resolve_lora

    overrides = {k: getattr(args, k) for k in ("base", "lora", "device", "dtype")}
    cfg = load_config(args.config, overrides)
    cfg = cfg.model_copy(update={"lora": resolve_lora(cfg.lora, cfg.wandb_cache_dir)})
    fields = {k: getattr(args, k) for k in GenParams.model_fields if hasattr(args, k)}
    try:
        params = GenParams.parse(fields, cfg)
    except ClientError as e:
        raise CVGenError(f"--{e}") from None
    try:
        data = Path(args.image).read_bytes()
    except OSError as e:
        raise CVGenError(f"{args.image}: cannot read: {e.strerror or e}") from None
    try:
        photo = decode_photo(data, "image", cfg.image_size, cfg.max_pixels)
    except ClientError as e:
        raise CVGenError(f"{args.image}: {e.message}") from None
    engine = Img2ImgEngine.load(cfg)
    result = engine.generate([GenRequest(photo, params)])[0]
    out = Path(args.out)
    save_image_atomic(result.image, out, quality=cfg.jpeg_quality)
    print(f"cvgen: wrote {out} ({result.image.width}x{result.image.height}, seed {params.seed})")
    return 0
