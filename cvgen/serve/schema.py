"""What a request is: its parameters (a pydantic model), its photo, and what comes back.

One request has one shape from validation to the model: :class:`GenRequest` (the photo at model
resolution and the validated :class:`GenParams`) goes through LitServe's queue, and one
:class:`GenResult` comes back. The HTTP server and ``cvgen generate`` validate with the same
:meth:`GenParams.parse`. Every client mistake is a :class:`ClientError` that carries an HTTP
status and the name of the field at fault; nothing here touches the model.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from PIL import Image
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cvgen.images import ImageError, open_image, resize_and_crop
from cvgen.serve.config import ServeConfig
from cvgen.serve.validation import UNKNOWN, first_error, phrase, shown

MAX_SEED = 2**32 - 1
MAX_ASPECT = 8
IMAGE_FIELDS = ("image", "image_b64", "image_url")


class ClientError(Exception):
    """A mistake in a request: answered with ``status`` and a JSON body naming ``field``."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status = status
        self.field = field
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"detail": str(self), "field": self.field}


# --- field types: how a value is read from a form string or a JSON value ----------------------


def _number(value: Any, integer: bool) -> int | float:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PydanticCustomError("number", "must be {kind}", {"kind": kind})
    if isinstance(value, str):
        try:
            x: int | float = int(value.strip()) if integer else float(value.strip())
        except ValueError:
            got = shown(value, 40)
            raise PydanticCustomError(
                "number", "must be {kind}, got {got}", {"kind": kind, "got": got}
            ) from None
    else:
        x = value
    if isinstance(x, float) and not math.isfinite(x):
        raise PydanticCustomError("number", "must be finite")
    if integer and isinstance(x, float):
        if not x.is_integer():
            raise PydanticCustomError("number", "must be an integer")
        x = int(x)
    if not integer:
        try:
            x = float(x)
        except OverflowError:
            raise PydanticCustomError("number", "is out of range") from None
    return x


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("text", "must be text")
    if "\x00" in value:
        raise PydanticCustomError("text", "contains a NUL character")
    return value


Number = BeforeValidator(lambda v: _number(v, integer=False))
Integer = BeforeValidator(lambda v: _number(v, integer=True))
Text = BeforeValidator(_text)


def _limits(info: ValidationInfo) -> ServeConfig | None:
    return info.context["cfg"] if info.context else None


def at_most(key: str) -> AfterValidator:
    """At most the config's ``key`` (checked when parsing against a config)."""

    def check(value: float, info: ValidationInfo) -> float:
        cfg = _limits(info)
        if cfg is not None and value > getattr(cfg, key):
            limit = getattr(cfg, key)
            raise PydanticCustomError("limit", "must be <= {limit}", {"limit": limit})
        return value

    return AfterValidator(check)


def max_chars(key: str) -> AfterValidator:
    """At most the config's ``key`` characters (checked when parsing against a config)."""

    def check(value: str, info: ValidationInfo) -> str:
        cfg = _limits(info)
        if cfg is not None and len(value) > getattr(cfg, key):
            limit = getattr(cfg, key)
            raise PydanticCustomError(
                "length", "is longer than {limit} characters", {"limit": limit}
            )
        return value

    return AfterValidator(check)


@dataclass(frozen=True)
class FromConfig:
    """A field's default when a request sends none (or a blank value): the config's ``key``."""

    key: str


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


class GenParams(BaseModel):
    """The generation parameters of one request, validated and with defaults filled in.

    To add a request field, declare it here: its type with the reader for form strings
    (``Number``, ``Integer``, ``Text``), its limits (``Field``, ``at_most``, ``max_chars``)
    and, when the server config supplies its default, ``FromConfig(key)``. Fields in ``BATCH_KEY`` must be
    equal for requests to share a pipeline call.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    BATCH_KEY: ClassVar[tuple[str, ...]] = ("steps", "strength", "guidance_scale", "lora_scale")
    PRIVATE: ClassVar[frozenset[str]] = frozenset({"prompt", "negative_prompt"})

    prompt: Annotated[str, Text, max_chars("max_prompt_chars"), AfterValidator(str.strip)]
    negative_prompt: Annotated[
        str, Text, max_chars("max_prompt_chars"), FromConfig("default_negative_prompt")
    ]
    strength: Annotated[float, Number, Field(gt=0, le=1), FromConfig("default_strength")]
    steps: Annotated[int, Integer, Field(ge=1), at_most("max_steps"), FromConfig("default_steps")]
    guidance_scale: Annotated[
        float,
        Number,
        Field(ge=0),
        at_most("max_guidance_scale"),
        FromConfig("default_guidance_scale"),
    ]
    seed: Annotated[int, Integer, Field(ge=0, le=MAX_SEED)] = Field(default_factory=random_seed)
    lora_scale: Annotated[
        float, Number, Field(ge=0), at_most("max_lora_scale"), FromConfig("default_lora_scale")
    ]

    @classmethod
    def parse(cls, fields: Mapping[str, Any], cfg: ServeConfig) -> GenParams:
        """Validate the parameter fields of a request against ``cfg`` (its limits, defaults and
        LoRA); a missing field, ``None`` or a blank string gets the default."""
        sent = {
            k: v
            for k, v in fields.items()
            if v is not None and not (isinstance(v, str) and not v.strip())
        }
        values = dict(sent)
        for name, info in cls.model_fields.items():
            default = next((m for m in info.metadata if isinstance(m, FromConfig)), None)
            if default is not None and name not in values:
                values[name] = getattr(cfg, default.key)
        try:
            return cls.model_validate(values, context={"cfg": cfg, "sent": frozenset(sent)})
        except ValidationError as e:
            raise _client_error(e) from None

    @model_validator(mode="after")
    def _servable(self, info: ValidationInfo) -> GenParams:
        if not info.context:
            return self
        cfg, sent = info.context["cfg"], info.context["sent"]
        if int(self.steps * self.strength) < 1:
            # img2img runs int(steps * strength) denoising steps; zero would be an empty run
            raise ClientError(
                422,
                "steps",
                f"steps x strength must be at least 1 ({self.steps} x {self.strength})",
            )
        if "lora_scale" in sent:
            if not cfg.lora_loaded:
                raise ClientError(422, "lora_scale", "this server has no LoRA loaded")
            fixed = cfg.fixed_lora_scale
            if fixed is not None and not math.isclose(self.lora_scale, fixed):
                raise ClientError(
                    422,
                    "lora_scale",
                    f"the LoRA is fused at scale {fixed}; start the server with "
                    "fuse_lora: false to vary it per request",
                )
        return self

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with the same key can run in one pipeline call."""
        return tuple(getattr(self, name) for name in self.BATCH_KEY)

    def public(self) -> dict[str, Any]:
        """The parameters without the prompts (for headers and logs)."""
        return self.model_dump(exclude=set(self.PRIVATE))


def _client_error(error: ValidationError) -> ClientError:
    details = first_error(error)
    name = str(details["loc"][0])[:64] if details["loc"] else None
    if details["type"] in UNKNOWN:
        return ClientError(422, name, "unknown field")
    message = phrase(details)
    if details["type"] in ("greater_than", "greater_than_equal", "less_than_equal", "limit"):
        got = shown(details["input"], 40)
        message += f", got {got}" if got else ""
    return ClientError(422, name, message)


# --- the photo ------------------------------------------------------------------------------


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


def decode_photo(data: bytes, field: str, size: int, max_pixels: int) -> Image.Image:
    """A client's photo, decoded (at most ``max_pixels``) and brought to ``size`` x ``size``,
    cropped so the face stays in frame; :class:`ClientError` naming ``field`` if it cannot be."""
    try:
        img = open_image(data, max_pixels=max_pixels)
    except ImageError as e:
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise ClientError(422, field, message.removeprefix("<bytes>: ")) from None
    except Exception as e:  # any decoder failure on client bytes is the client's problem
        raise ClientError(422, field, f"not a readable image ({type(e).__name__})") from None
    if max(img.size) > MAX_ASPECT * min(img.size):
        # scaling such a strip to cover the model's square would need huge buffers
        raise ClientError(422, field, f"aspect ratio {img.width}x{img.height} is too extreme")
    return resize_and_crop(img, size, size)


# --- what goes through the queue, and what comes back -------------------------------------


@dataclass
class GenRequest:
    """One request on its way to the model: the photo at model resolution and its validated
    parameters. This object goes through LitServe's queue to the inference worker."""

    image: Image.Image
    params: GenParams
    request_id: str = ""


@dataclass
class GenResult:
    """One generated image and what produced it. This object comes back from the worker."""

    image: Image.Image
    params: GenParams
    batch_size: int  # requests in the pipeline call that made this image
    batch_index: int  # position in that call (0: the first)
    predict_seconds: float  # wall time of that pipeline call
    memory: dict[str, int] = field(default_factory=dict)  # worker memory after the call
