"""What a request is: its parameters (a pydantic model), its photo, and what comes back.

One request has one shape from validation to the model: :class:`GenRequest` (the photo framed
at the output size, the face found in it, and the validated :class:`GenParams`) goes through
LitServe's queue, and one :class:`GenResult` comes back. The HTTP server and ``cvgen generate``
validate with the same :meth:`GenParams.parse` and frame with the same
:func:`frame_request_photo`. Every client mistake is a :class:`ClientError` that carries an HTTP
status and the name of the field at fault; nothing here touches the model.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

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

from cvgen.faces import Box
from cvgen.images import ImageError, open_image
from cvgen.portrait import Framed, Framing, frame_photo
from cvgen.serve.config import ServeConfig
from cvgen.serve.validation import UNKNOWN, first_error, phrase, shown

if TYPE_CHECKING:
    from cvgen.faces import FaceDetector
    from cvgen.serve.looks import Look

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


def _text(value: Any) -> str | None:
    if value is None:  # an optional field's default (a required one rejects it after)
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("text", "must be text")
    if "\x00" in value:
        raise PydanticCustomError("text", "contains a NUL character")
    return value


_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise PydanticCustomError("boolean", "must be true or false")


Number = BeforeValidator(lambda v: _number(v, integer=False))
Integer = BeforeValidator(lambda v: _number(v, integer=True))
Text = BeforeValidator(_text)
Boolean = BeforeValidator(_boolean)


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
    """The generation parameters of one request (``POST /predict``), validated and with
    defaults filled in: from the request, then its look, then the server config.

    To add a request field, declare it here: its type with the reader for form strings
    (``Number``, ``Integer``, ``Text``, ``Boolean``), its limits (``Field``, ``at_most``,
    ``max_chars``), its ``description`` (the API documentation) and, when the server config
    supplies its default, ``FromConfig(key)``. Fields in ``BATCH_KEY`` must be equal for
    requests to share a pipeline call.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    BATCH_KEY: ClassVar[tuple[str, ...]] = (
        "steps",
        "strength",
        "guidance_scale",
        "lora_scale",
        "lora",  # a batch never mixes LoRAs
        "keep_face",  # keep_face runs the inpainting pipeline
        "framing",  # one image size per call
    )
    PRIVATE: ClassVar[frozenset[str]] = frozenset({"prompt", "negative_prompt"})

    prompt: Annotated[
        str,
        Text,
        max_chars("max_prompt_chars"),
        AfterValidator(str.strip),
        Field(description="what to make of the photo; with a look, added to the look's prompt"),
    ]
    negative_prompt: Annotated[
        str,
        Text,
        max_chars("max_prompt_chars"),
        FromConfig("default_negative_prompt"),
        Field(description="what to avoid; with a look, added to the look's negative prompt"),
    ]
    strength: Annotated[
        float,
        Number,
        Field(gt=0, le=1, description="how far from the photo to go, in (0, 1]"),
        FromConfig("default_strength"),
    ]
    steps: Annotated[
        int,
        Integer,
        Field(ge=1, description="denoising steps (img2img runs steps x strength of them)"),
        at_most("max_steps"),
        FromConfig("default_steps"),
    ]
    guidance_scale: Annotated[
        float,
        Number,
        Field(ge=0, description="classifier-free guidance: how closely to follow the prompt"),
        at_most("max_guidance_scale"),
        FromConfig("default_guidance_scale"),
    ]
    seed: Annotated[
        int,
        Integer,
        Field(ge=0, le=MAX_SEED, description="random seed (default: random, answered in X-Seed)"),
    ] = Field(default_factory=random_seed)
    lora_scale: Annotated[
        float,
        Number,
        Field(ge=0, description="LoRA strength (fixed where one LoRA is fused)"),
        at_most("max_lora_scale"),
        FromConfig("default_lora_scale"),
    ]
    look: Annotated[
        str | None,
        Text,
        Field(description="a look from GET /looks: its prompt, negative prompt and settings"),
    ] = None
    lora: Annotated[
        str | None,
        Text,
        Field(description="which LoRA from GET /loras (default: the server's default LoRA)"),
        FromConfig("default_lora_name"),
    ] = None
    keep_face: Annotated[
        bool,
        Boolean,
        Field(description="keep the face's pixels and regenerate only around it"),
        FromConfig("default_keep_face"),
    ] = False
    framing: Annotated[
        Framing,
        Text,
        Field(description="aspect of the head-and-shoulders frame: square, 4:5, 3:4, 35x45"),
        FromConfig("default_framing"),
    ] = "square"

    @classmethod
    def parse(
        cls,
        fields: Mapping[str, Any],
        cfg: ServeConfig,
        looks: Mapping[str, Look] | None = None,
    ) -> GenParams:
        """Validate the parameter fields of a request against ``cfg`` (its limits, defaults and
        LoRAs) and ``looks``; a missing field, ``None`` or a blank string gets the default: the
        look's where the request names one (:meth:`cvgen.serve.looks.Look.merge`), else the
        config's."""
        sent = {
            k: v
            for k, v in fields.items()
            if v is not None and not (isinstance(v, str) and not v.strip())
        }
        values = dict(sent)
        name = sent.get("look")
        if name is not None:
            look = (looks or {}).get(name) if isinstance(name, str) else None
            if look is None:
                known = ", ".join(sorted(looks or {})) or "none"
                raise ClientError(422, "look", f"unknown look {shown(name, 40)}; known: {known}")
            values = look.merge(sent)
        for field_name, info in cls.model_fields.items():
            default = next((m for m in info.metadata if isinstance(m, FromConfig)), None)
            if default is not None and field_name not in values:
                values[field_name] = getattr(cfg, default.key)
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
        if ("lora_scale" in sent or "lora" in sent) and not cfg.lora_loaded:
            field = "lora" if "lora" in sent else "lora_scale"
            raise ClientError(422, field, "this server has no LoRA loaded")
        if "lora" in sent and self.lora not in cfg.lora_map:
            known = ", ".join(cfg.lora_map)
            raise ClientError(
                422, "lora", f"unknown LoRA {shown(self.lora, 40)}; this server has: {known}"
            )
        if "lora_scale" in sent:
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
    if details["type"] == "missing" and name == "prompt":
        return ClientError(422, name, "is required: send a prompt or a look")
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


def decode_photo(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """A client's photo, decoded (at most ``max_pixels``); :class:`ClientError` naming
    ``field`` if it cannot be used."""
    try:
        img = open_image(data, max_pixels=max_pixels)
    except ImageError as e:
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise ClientError(422, field, message.removeprefix("<bytes>: ")) from None
    except Exception as e:  # any decoder failure on client bytes is the client's problem
        raise ClientError(422, field, f"not a readable image ({type(e).__name__})") from None
    if max(img.size) > MAX_ASPECT * min(img.size):
        # scaling such a strip to cover the model's frame would need huge buffers
        raise ClientError(422, field, f"aspect ratio {img.width}x{img.height} is too extreme")
    return img


NO_FACE = "no face found in the photo; send a photo with a face, or keep_face=false"


def frame_request_photo(
    img: Image.Image, field: str, params: GenParams, cfg: ServeConfig, detector: FaceDetector
) -> tuple[Framed, float]:
    """The photo framed as ``params`` ask (head and shoulders on the largest face, or the
    centre crop without one) and the seconds face detection took; with ``keep_face`` a photo
    without a face is a 422 naming ``field``."""
    t0 = time.perf_counter()
    faces = detector.detect(img)
    detect_s = time.perf_counter() - t0
    if params.keep_face and not faces:
        raise ClientError(422, field, NO_FACE)
    return frame_photo(img, faces, cfg.framed_size(params.framing), cfg.face_fraction), detect_s


# --- what goes through the queue, and what comes back -------------------------------------


@dataclass
class GenRequest:
    """One request on its way to the model: the framed photo and its validated parameters.
    This object goes through LitServe's queue to the inference worker."""

    image: Image.Image  # the framed photo, at the output size
    params: GenParams
    request_id: str = ""
    face: Box | None = None  # the face in ``image``'s pixels (None: none found)
    faces_found: int = 0  # faces in the photo (the largest is ``face``)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage before the queue

    @classmethod
    def framed(cls, framed: Framed, params: GenParams, **kw: Any) -> GenRequest:
        return cls(framed.image, params, face=framed.face, faces_found=framed.faces_found, **kw)


@dataclass
class GenResult:
    """One generated image and what produced it. This object comes back from the worker."""

    image: Image.Image
    params: GenParams
    batch_size: int  # requests in the pipeline call that made this image
    batch_index: int  # position in that call (0: the first)
    predict_seconds: float  # wall time of that pipeline call
    memory: dict[str, int] = field(default_factory=dict)  # worker memory after the call
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage in the worker
    worker: int = 0  # the inference worker that made it (LitServe's worker id)
    cpu_seconds: float = 0.0  # CPU time the worker process has used so far
