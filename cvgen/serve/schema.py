"""Request fields: parsing and validation shared by the HTTP server and ``cvgen generate``.

Every client mistake becomes a :class:`ClientError` that carries an HTTP status and the name
of the field at fault; nothing here touches the model.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cvgen.serve.config import ServeConfig

MAX_SEED = 2**32 - 1
IMAGE_FIELDS = ("image", "image_b64", "image_url")
PARAM_FIELDS = (
    "prompt",
    "negative_prompt",
    "strength",
    "steps",
    "guidance_scale",
    "seed",
    "lora_scale",
)
KNOWN_FIELDS = frozenset(IMAGE_FIELDS + PARAM_FIELDS)


class ClientError(Exception):
    """A mistake in a request: answered with ``status`` and a JSON body naming ``field``."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status = status
        self.field = field
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"detail": str(self), "field": self.field}


@dataclass(frozen=True)
class GenParams:
    """The generation parameters of one request, validated and with defaults filled in."""

    prompt: str
    negative_prompt: str
    strength: float
    steps: int
    guidance_scale: float
    seed: int
    lora_scale: float

    def batch_key(self) -> tuple[int, float, float, float]:
        """Requests with the same key can run in one pipeline call."""
        return (self.steps, self.strength, self.guidance_scale, self.lora_scale)

    def public(self) -> dict[str, Any]:
        """The parameters without the prompts (for headers and logs)."""
        d = asdict(self)
        d.pop("prompt")
        d.pop("negative_prompt")
        return d


def _number(field: str, value: Any, integer: bool) -> float:
    if isinstance(value, bool) or value is None:
        raise ClientError(422, field, "must be a number")
    if isinstance(value, int | float):
        x = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            x = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise ClientError(422, field, f"must be {kind}, got {value[:40]!r}") from None
    else:
        raise ClientError(422, field, "must be a number")
    if isinstance(x, float) and not math.isfinite(x):
        raise ClientError(422, field, "must be finite")
    if integer and isinstance(x, float):
        if not x.is_integer():
            raise ClientError(422, field, "must be an integer")
        x = int(x)
    if not integer:
        try:
            x = float(x)
        except OverflowError:
            raise ClientError(422, field, "is out of range") from None
    return x


def _in_range(field: str, x: float, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = (lo < x if lo_open else lo <= x) and x <= hi
    if not ok:
        left = "(" if lo_open else "["
        raise ClientError(422, field, f"must be in {left}{lo}, {hi}], got {x}")


def _text(field: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise ClientError(422, field, "must be text")
    if len(value) > limit:
        raise ClientError(422, field, f"is longer than {limit} characters")
    if "\x00" in value:
        raise ClientError(422, field, "contains a NUL character")
    return value


def parse_params(
    fields: Mapping[str, Any],
    cfg: ServeConfig,
    lora_loaded: bool,
    fixed_lora_scale: float | None,
) -> GenParams:
    """Validate the parameter fields of a request and fill in the defaults.

    ``fixed_lora_scale`` is the scale the LoRA was fused at (None when the scale can change per
    request); a request may then only ask for that scale.
    """
    unknown = sorted(set(fields) - KNOWN_FIELDS)
    if unknown:
        raise ClientError(422, unknown[0][:64], "unknown field")

    def get(name: str) -> Any:
        v = fields.get(name)
        return None if v is None or (isinstance(v, str) and v.strip() == "") else v

    raw_prompt = fields.get("prompt")
    if raw_prompt is None or (isinstance(raw_prompt, str) and not raw_prompt.strip()):
        raise ClientError(422, "prompt", "is required")
    prompt = _text("prompt", raw_prompt, cfg.max_prompt_chars).strip()
    negative = get("negative_prompt")
    negative_prompt = (
        cfg.default_negative_prompt
        if negative is None
        else _text("negative_prompt", negative, cfg.max_prompt_chars)
    )

    strength = cfg.default_strength
    if (v := get("strength")) is not None:
        strength = float(_number("strength", v, integer=False))
        _in_range("strength", strength, 0.0, 1.0, lo_open=True)
    steps = cfg.default_steps
    if (v := get("steps")) is not None:
        steps = int(_number("steps", v, integer=True))
        _in_range("steps", steps, 1, cfg.max_steps)
    if int(steps * strength) < 1:
        # img2img runs int(steps * strength) denoising steps; zero would be an empty run
        raise ClientError(
            422, "steps", f"steps x strength must be at least 1 ({steps} x {strength})"
        )
    guidance = cfg.default_guidance_scale
    if (v := get("guidance_scale")) is not None:
        guidance = float(_number("guidance_scale", v, integer=False))
        _in_range("guidance_scale", guidance, 0.0, cfg.max_guidance_scale)
    if (v := get("seed")) is not None:
        seed = int(_number("seed", v, integer=True))
        _in_range("seed", seed, 0, MAX_SEED)
    else:
        seed = secrets.randbelow(MAX_SEED + 1)

    lora_scale = fixed_lora_scale if fixed_lora_scale is not None else cfg.lora_scale
    if (v := get("lora_scale")) is not None:
        asked = float(_number("lora_scale", v, integer=False))
        _in_range("lora_scale", asked, 0.0, cfg.max_lora_scale)
        if not lora_loaded:
            raise ClientError(422, "lora_scale", "this server has no LoRA loaded")
        if fixed_lora_scale is not None and not math.isclose(asked, fixed_lora_scale):
            raise ClientError(
                422,
                "lora_scale",
                f"the LoRA is fused at scale {fixed_lora_scale}; start the server with "
                "fuse_lora: false to vary it per request",
            )
        lora_scale = asked
    if not lora_loaded:
        lora_scale = 0.0
    return GenParams(
        prompt=prompt,
        negative_prompt=negative_prompt,
        strength=strength,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        lora_scale=lora_scale,
    )


def check_image_sources(present: Mapping[str, bool]) -> str:
    """The one image field a request used; 422 for none or several."""
    used = [name for name in IMAGE_FIELDS if present.get(name)]
    if not used:
        raise ClientError(
            422, "image", "is required: send a file 'image', 'image_b64' or 'image_url'"
        )
    if len(used) > 1:
        raise ClientError(422, used[1], f"send only one of {', '.join(used)}")
    return used[0]
