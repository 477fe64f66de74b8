"""The server's settings: a dataclass read from YAML (``configs/serve.yaml``) with CLI overrides.

Precedence, lowest first: the dataclass defaults, the YAML file, command-line flags. Unknown
keys and values of the wrong type are errors that name the key. Secrets are not settings: the
API key is read from the environment variable named by ``api_key_env``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvgen.errors import CVGenError


@dataclass
class ServeConfig:
    """Everything ``cvgen serve`` and ``cvgen generate`` need; see configs/serve.yaml."""

    # model
    base: str = "models/tiny"
    lora: str | None = None
    lora_scale: float = 1.0
    fuse_lora: bool = True
    scheduler: str = "dpm++"
    device: str = "auto"
    dtype: str = "auto"
    resolution: int | None = None
    wandb_cache_dir: str = "~/.cache/cvgen/wandb"
    # HTTP
    host: str = "0.0.0.0"
    port: int = 8080
    max_batch_size: int = 4
    batch_timeout: float = 0.05
    queue_timeout: float = 60.0
    max_body_bytes: int = 10_000_000
    api_key_env: str = "CVGEN_API_KEY"
    shutdown_grace: float = 8.0
    log_level: str = "info"
    # request defaults and limits
    default_strength: float = 0.6
    default_steps: int = 30
    default_guidance_scale: float = 7.0
    default_negative_prompt: str = ""
    max_steps: int = 100
    max_guidance_scale: float = 30.0
    max_lora_scale: float = 2.0
    max_prompt_chars: int = 1000
    max_pixels: int = 40_000_000
    jpeg_quality: int = 92
    # image_url fetching
    url_fetch: bool = True
    url_timeout: float = 10.0
    url_max_bytes: int = 10_000_000
    url_max_redirects: int = 3
    url_allowlist: list[str] = field(default_factory=list)
    # speed levers (see cvgen.perf)
    channels_last: bool = False
    compile_unet: bool = False
    compile_mode: str = "default"
    attention: str = "sdpa"
    allow_tf32: bool = True
    flush_denormal: bool = True
    warmup: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`CVGenError` naming the first setting that is out of range."""

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise CVGenError(f"serve config: {key} must be {what}, got {getattr(self, key)!r}")

        need(self.max_batch_size >= 1, "max_batch_size", ">= 1")
        need(self.batch_timeout >= 0, "batch_timeout", ">= 0")
        need(self.queue_timeout > 0, "queue_timeout", "> 0")
        need(1 <= self.port <= 65535, "port", "in 1..65535")
        need(self.max_body_bytes > 0, "max_body_bytes", "> 0")
        need(self.shutdown_grace >= 0, "shutdown_grace", ">= 0")
        need(0 < self.default_strength <= 1, "default_strength", "in (0, 1]")
        need(self.max_steps >= 1, "max_steps", ">= 1")
        need(1 <= self.default_steps <= self.max_steps, "default_steps", "in 1..max_steps")
        need(
            0 <= self.default_guidance_scale <= self.max_guidance_scale,
            "default_guidance_scale",
            "in [0, max_guidance_scale]",
        )
        need(0 <= self.lora_scale <= self.max_lora_scale, "lora_scale", "in [0, max_lora_scale]")
        need(self.resolution is None or self.resolution >= 8, "resolution", "null or >= 8")
        need(1 <= self.jpeg_quality <= 95, "jpeg_quality", "in 1..95")
        need(self.url_timeout > 0, "url_timeout", "> 0")
        need(self.url_max_bytes > 0, "url_max_bytes", "> 0")
        need(self.url_max_redirects >= 0, "url_max_redirects", ">= 0")
        need(self.attention in ("sdpa", "default"), "attention", "sdpa or default")
        need(
            self.compile_mode in ("default", "reduce-overhead", "max-autotune"),
            "compile_mode",
            "default, reduce-overhead or max-autotune",
        )
        for net in self.url_allowlist:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise CVGenError(
                    f"serve config: url_allowlist entry {net!r} is not an IP network (CIDR)"
                ) from None

    def api_key(self) -> str | None:
        """The API key from the environment (None: auth disabled)."""
        return os.environ.get(self.api_key_env) or None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        return from_mapping(json.loads(text))


_FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)}


def _coerce(key: str, value: Any) -> Any:
    """Check ``value`` against the type of ``key``'s default (ints are accepted for floats)."""
    default = ServeConfig.__dataclass_fields__[key]
    hint = str(default.type)
    if value is None:
        if "None" in hint:
            return None
        raise CVGenError(f"serve config: {key} may not be null")
    if hint.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CVGenError(f"serve config: {key} must be a list of strings, got {value!r}")
        return list(value)
    if hint.startswith("bool"):
        ok = isinstance(value, bool)
    elif hint.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint.startswith("float"):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise CVGenError(f"serve config: {key} has the wrong type ({hint}): {value!r}")
    return value


def from_mapping(values: Mapping[str, Any]) -> ServeConfig:
    """A config from a mapping; unknown keys are an error."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise CVGenError(f"serve config: unknown key(s) {', '.join(unknown)}")
    return ServeConfig(**{k: _coerce(k, v) for k, v in values.items()})


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> ServeConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` whose value is not None."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise CVGenError(f"{p}: cannot read the serve config: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise CVGenError(f"{p}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise CVGenError(f"{p}: the serve config must be a mapping of keys to values")
        values.update(loaded or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_mapping(values)
