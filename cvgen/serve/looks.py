"""Looks: named, finished prompts with their settings, chosen by a request's ``look`` field.

A looks file is a YAML mapping of look names to a description, a prompt, a negative prompt, a
default strength and guidance scale and, optionally, a framing. cvgen ships one
(``cvgen/configs/looks.yaml``, copied by ``cvgen init``); the serve config's ``looks`` key names
an operator's own file instead. Mistakes are one line naming the file and line
(``looks.yaml:14: corporate.strength must be <= 1, got 1.5``), found before any worker starts.

How a look combines with a request (:meth:`Look.merge`): fields the request sends win; text
adds to the look's (``prompt`` and ``negative_prompt`` are appended to the look's, after a
comma), and numbers and choices replace the look's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cvgen.errors import CVGenError
from cvgen.portrait import Framing
from cvgen.serve.config import LORA_NAME, ServeConfig, SettingError, config_error, read_yaml

SHIPPED_LOOKS = Path(__file__).resolve().parents[1] / "configs" / "looks.yaml"
TEXT_FIELDS = ("prompt", "negative_prompt")


class Look(BaseModel):
    """One look: what ``GET /looks`` shows and what a request with ``look`` starts from."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    description: str = Field(min_length=1, description="what the look gives, for people")
    prompt: str = Field(min_length=1, description="the finished prompt")
    negative_prompt: str = Field("", description="what the look avoids")
    strength: float = Field(gt=0, le=1, description="default strength of the look")
    guidance_scale: float = Field(ge=0, description="default guidance scale of the look")
    framing: Framing | None = Field(None, description="default framing (None: the server's)")

    def merge(self, sent: Mapping[str, Any]) -> dict[str, Any]:
        """The request fields ``sent`` on top of this look: text is appended to the look's
        text, anything else replaces the look's value."""
        values = dict(sent)
        for key, value in self.model_dump(exclude={"description"}, exclude_none=True).items():
            given = sent.get(key)
            if value == "":
                continue  # no negative prompt of its own: the server's default stays
            if key not in sent:
                values[key] = value
            elif key in TEXT_FIELDS and isinstance(given, str) and value:
                values[key] = f"{value}, {given.strip()}"
        return values


def looks_path(cfg: ServeConfig) -> Path:
    """The looks file a server with ``cfg`` uses."""
    return Path(cfg.looks).expanduser() if cfg.looks else SHIPPED_LOOKS


def load_looks(cfg: ServeConfig) -> dict[str, Look]:
    """The looks of ``cfg`` (its ``looks`` file, else the shipped one), checked against its
    limits; a :class:`CVGenError` of one line naming the file and line for any mistake."""
    path = looks_path(cfg)
    raw, origins = read_yaml(path, "the looks file")
    if not raw:
        raise CVGenError(f"{path}: the looks file defines no looks")
    looks: dict[str, Look] = {}
    for name, entry in raw.items():
        where = origins.get((str(name),), str(path))
        if not isinstance(name, str) or not LORA_NAME.fullmatch(name):
            raise CVGenError(
                f"{where}: look name {name!r} must be letters, digits, _ or - (at most 64, "
                "starting with a letter or digit)"
            )
        if not isinstance(entry, dict):
            raise CVGenError(
                f"{where}: {name} must be a mapping of description, prompt, negative_prompt, "
                "strength, guidance_scale (and optionally framing)"
            )
        try:
            look = Look.model_validate_json(json.dumps(entry, default=str))
            _within_limits(look, cfg)
        except (ValidationError, SettingError) as e:
            raise config_error(e, origins, prefix=(name,), model=Look) from None
        looks[name] = look
    return looks


def _within_limits(look: Look, cfg: ServeConfig) -> None:
    """A look the server's limits would refuse would make every request for it a 422."""
    if look.guidance_scale > cfg.max_guidance_scale:
        raise SettingError(
            ("guidance_scale",),
            f"must be <= the server's max_guidance_scale ({cfg.max_guidance_scale})",
        )


def look_list(looks: Mapping[str, Look]) -> list[dict[str, Any]]:
    """What ``GET /looks`` answers: each look's name, description and settings."""
    return [{"name": name, **look.model_dump()} for name, look in looks.items()]
