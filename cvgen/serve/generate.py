"""``cvgen generate``: one portrait locally, without a server, through the server's code.

The photo goes through the same decoding, face detection and framing
(:func:`cvgen.serve.schema.frame_request_photo`), the parameters through the same validation
(:meth:`cvgen.serve.schema.GenParams.parse`, looks included) and the model through the same
:class:`cvgen.serve.engine.Img2ImgEngine`, so a seed gives the image the server gives for it on
the same machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cvgen.errors import CVGenError
from cvgen.portrait import FRAMINGS
from cvgen.serve.config import ServeConfig, load_config
from cvgen.serve.schema import GenParams


def add_parser(sub: Any) -> None:
    """Register ``cvgen generate``."""
    p = sub.add_parser(
        "generate",
        help="one portrait from a photo, without a server",
        description="Generate one portrait from a photo with the serving code path: a look or "
        "a prompt, the face kept (--keep-face, the config's default) and framed head and "
        "shoulders (--framing).",
    )
    p.add_argument("--image", required=True, help="input photo")
    p.add_argument("--prompt", help="what to make of it (with --look: added to the look's)")
    p.add_argument("--look", help="a look by name (the config's looks file; see GET /looks)")
    p.add_argument("--out", required=True, help="output JPEG path (written atomically)")
    p.add_argument("--config", help="serve YAML config for defaults (configs/serve.yaml)")
    p.add_argument("--base", help="base model: diffusers folder or hub id")
    p.add_argument(
        "--lora",
        help="a name from the config's loras, or a LoRA file, folder or "
        "wandb://entity/project/artifact:alias (default: the config's default LoRA)",
    )
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    p.add_argument("--negative_prompt")
    p.add_argument("--strength", type=float, help="in (0, 1]: how far from the photo to go")
    p.add_argument("--steps", type=int, help="denoising steps (img2img runs steps x strength)")
    p.add_argument("--guidance_scale", type=float, help="classifier-free guidance")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--lora_scale", type=float, help="LoRA strength")
    p.add_argument(
        "--keep-face",
        "--keep_face",
        dest="keep_face",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the face's pixels, regenerate around it (default: the config's)",
    )
    p.add_argument("--framing", choices=list(FRAMINGS), help="aspect of the frame")
    p.set_defaults(func=run)


def one_lora(cfg: ServeConfig, choice: str | None) -> ServeConfig:
    """``cfg`` with only the LoRA to use: ``choice`` as a name of its ``loras``, else as a LoRA
    reference replacing them; without ``choice``, its default LoRA."""
    if choice is None:
        name = cfg.default_lora_name
        loras = {name: cfg.lora_map[name]} if name is not None else {}
    elif choice in cfg.loras:
        loras = {choice: cfg.loras[choice]}
    else:
        loras = {}
    lora = choice if choice is not None and not loras else None
    return cfg.model_copy(update={"lora": lora, "loras": loras, "default_lora": None})


def run(args: argparse.Namespace) -> int:
    """Validate like the server, load the engine, write one image."""
    from cvgen.images import save_image_atomic
    from cvgen.pipeline import check_base
    from cvgen.portrait import face_detector
    from cvgen.serve.engine import Img2ImgEngine
    from cvgen.serve.looks import load_looks
    from cvgen.serve.schema import ClientError, GenRequest, decode_photo, frame_request_photo
    from cvgen.serve.wandb_lora import resolve_loras

    overrides = {k: getattr(args, k) for k in ("base", "device", "dtype")}
    cfg = load_config(args.config, overrides)
    check_base(cfg.base)  # the setup's mistakes before the photo's
    cfg = resolve_loras(one_lora(cfg, args.lora))
    fields = {k: getattr(args, k) for k in GenParams.model_fields if hasattr(args, k)}
    fields["lora"] = None  # the one LoRA loaded is the default
    try:
        params = GenParams.parse(fields, cfg, load_looks(cfg))
    except ClientError as e:
        raise CVGenError(f"--{e}") from None
    try:
        data = Path(args.image).read_bytes()
    except OSError as e:
        raise CVGenError(f"{args.image}: cannot read: {e.strerror or e}") from None
    try:
        photo = decode_photo(data, "image", cfg.max_pixels)
        framed, _ = frame_request_photo(photo, "image", params, cfg, face_detector())
    except ClientError as e:
        message = e.message.replace("keep_face=false", "--no-keep-face")
        raise CVGenError(f"{args.image}: {message}") from None
    engine = Img2ImgEngine.load(cfg.model_copy(update={"warmup": False}))  # one image
    result = engine.generate([GenRequest.framed(framed, params)])[0]
    out = Path(args.out)
    save_image_atomic(result.image, out, quality=cfg.jpeg_quality)
    face = framed.face
    kept = f", face {face.x},{face.y},{face.w},{face.h} kept" if face and params.keep_face else ""
    print(
        f"cvgen: wrote {out} ({result.image.width}x{result.image.height}, seed {params.seed}{kept})"
    )
    return 0
