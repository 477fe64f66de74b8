"""The server's settings: a pydantic model read from YAML (``configs/serve.yaml``) with overrides.

Precedence, lowest first: the model's defaults, the YAML file, ``$PORT`` (port only), then
command-line flags. Values are checked strictly, as the JSON types YAML gives (an integer is
accepted where a number is asked, nothing else is converted). An unknown key, a wrong type or a
value out of range is a :class:`CVGenError` of one line that names the key and where it came
from: ``configs/serve.yaml:12: max_batch_size must be >= 1, got 0``.

The properties at the end say what follows from the settings (the LoRAs by name and the
default one, whether one is fused and its scale fixed, the image sizes); they are worked out
here only. The looks file named by ``looks`` is read by :mod:`cvgen.serve.looks`. Secrets are not settings: the API key is read
from the environment variable named by ``api_key_env``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cvgen.accel import ServeLevers
from cvgen.data.prepare import PrepareConfig
from cvgen.errors import CVGenError
from cvgen.pipeline import DEFAULT_ADAPTER, SPEED_ADAPTER
from cvgen.portrait import Framing, framed_size
from cvgen.serve.validation import UNKNOWN, first_error, phrase, shown

DEFAULT_RESOLUTION = 512
DEFAULT_SCALE_FACTOR = 8
FEW_STEP_SCHEDULERS = ("lcm", "tcd")  # what a speed_lora (LCM-LoRA, TCD-LoRA) needs
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
Location = tuple[str, ...]


class SettingError(CVGenError):
    """A value that is wrong given another one; ``keys``: the key at fault, then the other."""

    def __init__(self, keys: Location, message: str) -> None:
        super().__init__(f"{keys[0]} {message}")
        self.keys = keys
        self.message = message


class ServeConfig(BaseModel):
    """Everything ``cvgen serve`` and ``cvgen generate`` need; see configs/serve.yaml."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # model
    base: str = "models/tiny"
    lora: str | None = None  # one LoRA: short for loras: {default: <lora>}
    loras: dict[str, str] = Field(default_factory=dict)  # name -> LoRA reference
    default_lora: str | None = None  # the LoRA of a request that names none (None: the first)
    lora_scale: float = Field(1.0, ge=0)
    fuse_lora: bool = True
    scheduler: str = "dpm++"
    speed_lora: str | None = None  # a few-step LoRA (LCM/TCD) file or folder under every LoRA
    speed_lora_scale: float = Field(1.0, ge=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    dtype: str = "auto"
    resolution: int | None = Field(None, ge=8)
    wandb_cache_dir: str = "~/.cache/cvgen/wandb"
    # HTTP
    host: Literal["0.0.0.0", "127.0.0.1", "::"] = "0.0.0.0"
    port: int = Field(8080, ge=1024, le=65535)  # LitServe refuses ports below 1024
    max_batch_size: int = Field(4, ge=1)
    batch_timeout: float = Field(0.05, ge=0)
    queue_timeout: float = Field(60.0, gt=0)
    max_body_bytes: int = Field(10_000_000, gt=0)
    api_key_env: str = "CVGEN_API_KEY"
    shutdown_grace: float = Field(8.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    docs: bool = True  # /docs (Swagger UI) and /openapi.json
    # request defaults and limits
    default_strength: float = Field(0.6, gt=0, le=1)
    default_steps: int = Field(30, ge=1)
    default_guidance_scale: float = Field(7.0, ge=0)
    default_negative_prompt: str = ""
    max_steps: int = Field(100, ge=1)
    max_guidance_scale: float = Field(30.0, ge=0)
    max_lora_scale: float = Field(2.0, ge=0)
    max_prompt_chars: int = Field(1000, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    # portraits: looks, framing, keeping the face
    looks: str | None = None  # a looks YAML file (None: the looks shipped with cvgen)
    default_keep_face: bool = True
    default_framing: Framing = "square"
    face_fraction: float = Field(PrepareConfig.face_fraction, gt=0, le=1)
    jpeg_quality: int = Field(92, ge=1, le=95)
    # image_url fetching
    url_fetch: bool = True
    url_timeout: float = Field(10.0, gt=0)
    url_max_bytes: int = Field(10_000_000, gt=0)
    url_max_redirects: int = Field(3, ge=0)
    url_allowlist: list[str] = Field(default_factory=list)
    # speed
    levers: ServeLevers = Field(default_factory=ServeLevers)
    warmup: bool = True
    # --- operations: workers, monitoring, reload (cvgen.serve.workers, .monitoring, .info) ---
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    devices: int | str = 1  # a count, or "auto" (checked below)
    workers_per_device: int = Field(1, ge=1)
    restart_workers: bool = True
    feature_log: str | None = None  # configs/serve.yaml turns it on
    feature_log_max_bytes: int = Field(16 * 2**20, ge=1024)
    drift_reference: str | None = None
    drift_window: int = Field(500, ge=1)
    drift_min_samples: int = Field(50, ge=1)
    reload_timeout: float = Field(600.0, gt=0)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        from cvgen.pipeline import SCHEDULERS

        if name not in SCHEDULERS:
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)}, got {name!r}")
        return name

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, name: str) -> str:
        from cvgen.pipeline import DTYPES

        if name != "auto" and name not in DTYPES:
            raise ValueError(f"must be auto or one of {', '.join(DTYPES)}, got {name!r}")
        return name

    @field_validator("loras")
    @classmethod
    def _lora_names(cls, loras: dict[str, str]) -> dict[str, str]:
        for name, ref in loras.items():
            if not LORA_NAME.fullmatch(name):
                raise ValueError(
                    f"name {name!r} must be letters, digits, _ or - (at most 64, starting with "
                    "a letter or digit)"
                )
            if not ref.strip():
                raise ValueError(f"{name} needs a LoRA file, folder or wandb:// reference")
        return loras

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        ok = value == "auto" or (type(value) is int and value >= 1)
        if not ok:
            raise ValueError(f"must be a number of devices >= 1 or auto, got {value!r}")
        return value

    @field_validator("url_allowlist")
    @classmethod
    def _networks(cls, nets: list[str]) -> list[str]:
        for net in nets:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"entry {net!r} is not an IP network (CIDR)") from None
        return nets

    @model_validator(mode="after")
    def _within_limits(self) -> ServeConfig:
        for key, limit in (
            ("default_steps", "max_steps"),
            ("default_guidance_scale", "max_guidance_scale"),
            ("lora_scale", "max_lora_scale"),
        ):
            value, top = getattr(self, key), getattr(self, limit)
            if value > top:
                raise SettingError((key, limit), f"must be <= {limit} ({top}), got {value!r}")
        if self.lora and self.loras:
            raise SettingError(
                ("lora", "loras"),
                "and loras are both set: lora X is short for loras: {default: X}; list every "
                "LoRA under loras",
            )
        if self.speed_lora is not None:
            self._check_speed_lora()
        if self.levers.quantize == "int8-static" and self.lora_map and not self.fused:
            raise SettingError(
                ("fuse_lora", "loras"),
                "must be true, with one LoRA under loras, for levers.quantize int8-static (it "
                "bakes the LoRA into the UNet's int8 graph; switchable adapters cannot be in it)",
            )
        if self.default_lora is not None and self.default_lora not in self.lora_map:
            known = ", ".join(self.lora_map) or "none"
            raise SettingError(
                ("default_lora", "loras"),
                f"must be one of the names under loras ({known}), got {self.default_lora!r}",
            )
        if self.litserve_accelerator == "cpu" and self.devices not in (1, "auto"):
            raise SettingError(
                ("devices", "accelerator"),
                f"must be 1 on CPU (one device; more processes: workers_per_device), got "
                f"{self.devices}",
            )
        if self.drift_min_samples > self.drift_window:
            raise SettingError(
                ("drift_min_samples", "drift_window"),
                f"must be <= drift_window ({self.drift_window}), got {self.drift_min_samples}",
            )
        if self.device.startswith("cuda:") and self.devices != 1:
            raise SettingError(
                ("devices", "device"),
                f"must be 1 when device names one GPU ({self.device}); use device: auto to serve "
                f"on several, got {self.devices!r}",
            )
        if int(self.default_steps * self.default_strength) < 1:  # img2img's own step count
            raise SettingError(
                ("default_steps", "default_strength"),
                f"x default_strength must be at least 1 denoising step, got "
                f"{self.default_steps} x {self.default_strength}",
            )
        return self

    def _check_speed_lora(self) -> None:
        if self.scheduler not in FEW_STEP_SCHEDULERS:
            raise SettingError(
                ("scheduler", "speed_lora"),
                f"must be {' or '.join(FEW_STEP_SCHEDULERS)} with a speed_lora (the scheduler "
                f"it was distilled for), got {self.scheduler!r}",
            )
        if not self.speed_lora or self.speed_lora.startswith("wandb://"):
            raise SettingError(
                ("speed_lora",), f"must be a local LoRA file or folder, got {self.speed_lora!r}"
            )
        if SPEED_ADAPTER in self.lora_map:
            raise SettingError(("loras",), f"name {SPEED_ADAPTER!r} is the speed_lora's own")

    # --- what follows from the settings ---
    @property
    def lora_map(self) -> dict[str, str]:
        """The served LoRAs by name (``lora: X`` is ``{"default": X}``), in the file's order."""
        return (
            dict(self.loras) if self.loras else ({DEFAULT_ADAPTER: self.lora} if self.lora else {})
        )

    @property
    def default_lora_name(self) -> str | None:
        """The LoRA of a request that names none: ``default_lora``, else the first listed."""
        return self.default_lora or next(iter(self.lora_map), None)

    @property
    def lora_loaded(self) -> bool:
        """Whether the server runs a LoRA."""
        return bool(self.lora_map)

    @property
    def fused(self) -> bool:
        """Whether the LoRA is fused into the weights: only where one LoRA is served."""
        return self.fuse_lora and len(self.lora_map) == 1

    @property
    def fixed_lora_scale(self) -> float | None:
        """The scale the LoRA is fused at, which requests cannot change; None: no LoRA, or
        unfused ones (several LoRAs, or ``fuse_lora: false``) whose scale each request may set."""
        return self.lora_scale if self.fused else None

    @property
    def default_lora_scale(self) -> float:
        """The LoRA scale of a request that sends none (0 without a LoRA)."""
        return self.lora_scale if self.lora_loaded else 0.0

    @property
    def image_size(self) -> int:
        """The side in px of the images this server makes: ``resolution``, else the model's."""
        return self.resolution or model_resolution(self.base)

    @property
    def scale_factor(self) -> int:
        """The VAE's downscale factor: image sides must be multiples of it."""
        return model_scale_factor(self.base)

    def framed_size(self, framing: str) -> tuple[int, int]:
        """(width, height) of an image at ``framing``: the longer side is :attr:`image_size`."""
        return framed_size(self.image_size, framing, self.scale_factor)

    @property
    def litserve_accelerator(self) -> str:
        """LitServe's ``accelerator``: ``accelerator``, else what ``device`` implies."""
        if self.accelerator != "auto":
            return self.accelerator
        if self.device == "cpu" or self.device == "mps":
            return self.device
        return "cuda" if self.device.startswith("cuda") else "auto"

    @property
    def features_wanted(self) -> bool:
        """Whether the server computes each photo's drift features (for the log or the score)."""
        return self.feature_log is not None or self.drift_reference is not None

    def api_key(self) -> str | None:
        """The API key from the environment (None: auth disabled)."""
        return os.environ.get(self.api_key_env) or None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        try:
            return cls.model_validate_json(text)
        except (ValidationError, SettingError) as e:
            raise config_error(e) from None


def model_resolution(base: str) -> int:
    """The native image size of a diffusers SD folder: UNet sample size x VAE downscale.

    Read from the config files, without loading weights; 512 (SD 1.5) when ``base`` is not a
    local folder.
    """
    try:
        unet = json.loads((Path(base) / "unet" / "config.json").read_text())
        return int(unet["sample_size"]) * model_scale_factor(base, strict=True)
    except (OSError, KeyError, TypeError, ValueError):
        return DEFAULT_RESOLUTION


def model_scale_factor(base: str, strict: bool = False) -> int:
    """The VAE downscale factor of a diffusers SD folder (8 for SD 1.5, also when ``base`` is
    not a local folder, unless ``strict``)."""
    try:
        vae = json.loads((Path(base) / "vae" / "config.json").read_text())
        return int(2 ** (len(vae["block_out_channels"]) - 1))
    except (OSError, KeyError, TypeError, ValueError):
        if strict:
            raise
        return DEFAULT_SCALE_FACTOR


_LEVERS = frozenset(f.name for f in dataclasses.fields(ServeLevers))


def config_error(
    error: ValidationError | SettingError,
    origins: Mapping[Location, str] | None = None,
    prefix: Location = (),
    model: type[BaseModel] | None = None,
) -> CVGenError:
    """The one-line error for a failed validation; ``origins`` maps a key (a path for nested
    keys) to where its value came from (``file:line``, ``--flag``, ``$PORT``). ``model`` (the
    ServeConfig by default) validated the mapping found at ``prefix`` in the file."""
    if isinstance(error, SettingError):
        places = [_origin(origins, (*prefix, key), "") for key in error.keys]
        whole = ".".join((*prefix, str(error)))
        return CVGenError(f"{next((p for p in places if p), 'serve config')}: {whole}")
    details = first_error(error)
    loc = tuple(str(part) for part in details["loc"])
    message = phrase(details)
    head = message.split(" ", 1)
    if model is None and loc == ("levers",) and head[0] in _LEVERS and len(head) > 1:
        loc, message = (*loc, head[0]), head[1]  # ServeLevers checks its own fields
    name = ".".join((*prefix, *loc)) or "serve config"
    if details["type"] in UNKNOWN:
        levers = model is None and loc[:1] == ("levers",)
        known = _LEVERS if levers else (model or ServeConfig).model_fields
        close = difflib.get_close_matches(loc[-1], sorted(known), n=1)
        text = f"unknown key {name}" + (f" (did you mean {close[0]}?)" if close else "")
    else:
        got = shown(details["input"]) if details["type"] not in ("value_error", "missing") else ""
        text = f"{name} {message}" + (f", got {got}" if got else "")
    return CVGenError(f"{_origin(origins, (*prefix, *loc))}: {text}")


def _origin(
    origins: Mapping[Location, str] | None, loc: Location, default: str = "serve config"
) -> str:
    for n in range(len(loc), 0, -1):  # the key, else the block it is in
        if origins and loc[:n] in origins:
            return origins[loc[:n]]
    return default


def read_yaml(
    path: str | os.PathLike[str], what: str = "the serve config"
) -> tuple[dict[str, Any], dict[Location, str]]:
    """The mapping in a YAML file and, for each key (nested keys as paths), ``file:line``;
    ``what`` names the file in errors."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise CVGenError(f"{p}: cannot read {what}: {e.strerror or e}") from e
    try:
        values = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CVGenError(f"{where}: not valid YAML: {problem}") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise CVGenError(f"{p}: {what} must be a mapping of keys to values")
    origins: dict[Location, str] = {}

    def walk(node: yaml.Node, prefix: Location) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                loc = (*prefix, str(key.value))
                origins[loc] = f"{p}:{key.start_mark.line + 1}"
                walk(value, loc)

    walk(root, ())
    return values, origins


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    origins: Mapping[str, str] | None = None,
) -> ServeConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` whose value is not None.

    ``origins`` names where an override came from for error messages (default ``--<key>``).
    """
    values: dict[str, Any] = {}
    where: dict[Location, str] = {}
    if path is not None:
        values, where = read_yaml(path)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
            where[(key,)] = (origins or {}).get(key, f"--{key}")
    try:
        # validated as JSON: YAML's types are JSON's, and nested blocks (levers) are mappings
        return ServeConfig.model_validate_json(json.dumps(values, default=str))
    except (ValidationError, SettingError) as e:
        raise config_error(e, where) from None
