"""``wandb://entity/project/artifact:alias`` LoRA references, resolved through the W&B API.

The artifact is downloaded once into ``<cache_dir>/<entity>/<project>/<artifact>/<version>``
and reused from there. The alias (``latest``, ``staging``, ``v3``) is resolved to a concrete
version first, so a moved alias fetches the new version and an unchanged one hits the cache.
Tests pass a fake ``api`` object; nothing here reaches the network by itself.

:func:`resolve_sources` also says what each LoRA is (:class:`LoraSource`: the reference, the
W&B version and digest it resolved to, and the sha256 of the weights file), which the server
reports in ``GET /info`` and ``cvgen_model_info``, and compares on ``POST /admin/reload``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cvgen.errors import CVGenError
from cvgen.lora import check_lora_fits, resolve_lora_file
from cvgen.serve.config import ServeConfig

SCHEME = "wandb://"
_REF = re.compile(
    r"^(?P<entity>[\w.-]+)/(?P<project>[\w.-]+)/(?P<name>[\w.-]+)(?::(?P<alias>[\w.-]+))?$"
)


def parse_ref(ref: str) -> tuple[str, str, str, str]:
    """(entity, project, artifact name, alias) from ``wandb://e/p/name[:alias]``."""
    m = _REF.match(ref.removeprefix(SCHEME))
    if not ref.startswith(SCHEME) or m is None:
        raise CVGenError(f"{ref!r} is not a W&B reference: wandb://entity/project/artifact:alias")
    return m["entity"], m["project"], m["name"], m["alias"] or "latest"


@dataclasses.dataclass(frozen=True)
class LoraSource:
    """What one served LoRA is: ``ref`` as configured, the local ``path`` it resolved to, for a
    ``wandb://`` reference the ``alias`` asked for, the ``version`` it named and the artifact's
    ``digest``, and the ``sha256`` of the weights file (the same file, the same hash)."""

    name: str
    ref: str
    path: str
    sha256: str
    alias: str | None = None
    version: str | None = None
    digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> LoraSource:
        return cls(**obj)


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 (hex) of the weights file of a LoRA file or folder."""
    folder, weight_name = resolve_lora_file(path)
    digest = hashlib.sha256()
    with open(Path(folder) / (weight_name or ""), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_lora(
    lora: str | None, cache_dir: str | os.PathLike[str], api: Any = None
) -> str | None:
    """A local LoRA path for ``lora``: paths are checked and returned, ``wandb://`` references
    are downloaded (once) into ``cache_dir``. ``api`` defaults to ``wandb.Api()``."""
    if not lora:
        return None
    return resolve_source("", lora, cache_dir, api).path


def resolve_source(
    name: str, lora: str, cache_dir: str | os.PathLike[str], api: Any = None
) -> LoraSource:
    """:func:`resolve_lora` with what the reference resolved to (:class:`LoraSource`)."""
    if not lora.startswith(SCHEME):
        try:
            resolve_lora_file(lora)
        except FileNotFoundError as e:
            raise CVGenError(str(e)) from None
        return LoraSource(name, lora, lora, weights_sha256(lora))
    entity, project, artifact_name, alias = parse_ref(lora)
    if api is None:
        import wandb

        api = wandb.Api()
    try:
        artifact = api.artifact(f"{entity}/{project}/{artifact_name}:{alias}", type="lora")
    except Exception as e:  # the W&B client raises many types (CommError, ValueError, ...)
        raise CVGenError(f"{lora}: cannot resolve the W&B artifact: {e}") from e
    version = str(getattr(artifact, "version", None) or alias)
    target = Path(cache_dir).expanduser() / entity / project / artifact_name / version
    if not _complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        try:
            artifact.download(root=str(tmp))
            (tmp / ".complete").write_text(f"{entity}/{project}/{artifact_name}:{version}\n")
            if target.exists():  # an incomplete earlier download
                shutil.rmtree(target)
            os.replace(tmp, target)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, CVGenError):
                raise
            raise CVGenError(f"{lora}: download failed: {e}") from e
    try:
        sha = weights_sha256(target)
    except FileNotFoundError as e:
        raise CVGenError(f"{lora}: the artifact holds no LoRA weights ({e})") from None
    digest = getattr(artifact, "digest", None)
    return LoraSource(name, lora, str(target), sha, alias, version, str(digest) if digest else None)


def resolve_sources(cfg: ServeConfig, api: Any = None) -> dict[str, LoraSource]:
    """Every LoRA of ``cfg`` resolved (``wandb://`` references downloaded once, aliases
    resolved now) and checked against the base model (one line for a LoRA made for another
    base, naming ``loras.NAME`` where several are configured), by name. The ``speed_lora`` (a
    local file or folder) is checked the same way."""
    resolved = {}
    for name, ref in cfg.lora_map.items():
        try:
            source = resolve_source(name, ref, cfg.wandb_cache_dir, api)
            check_lora_fits(cfg.base, source.path)
        except CVGenError as e:
            if not cfg.loras:
                raise
            raise CVGenError(f"loras.{name}: {e}") from None
        resolved[name] = source
    if cfg.speed_lora:
        try:
            resolve_lora_file(cfg.speed_lora)
            check_lora_fits(cfg.base, cfg.speed_lora)
        except (CVGenError, FileNotFoundError) as e:
            raise CVGenError(f"speed_lora: {e}") from None
    return resolved


def with_sources(cfg: ServeConfig, sources: dict[str, LoraSource]) -> ServeConfig:
    """``cfg`` serving the local paths of ``sources``, listed under ``loras`` (a lone
    ``lora: X`` becomes ``loras: {default: X}``)."""
    return cfg.model_copy(
        update={"lora": None, "loras": {name: s.path for name, s in sources.items()}}
    )


def resolve_loras(cfg: ServeConfig, api: Any = None) -> ServeConfig:
    """``cfg`` with every LoRA a local path, checked against the base (:func:`resolve_sources`)."""
    return with_sources(cfg, resolve_sources(cfg, api))


def _complete(path: Path) -> bool:
    return (path / ".complete").is_file()
