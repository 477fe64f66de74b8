"""``wandb://entity/project/artifact:alias`` LoRA references, resolved through the W&B API.

The artifact is downloaded once into ``<cache_dir>/<entity>/<project>/<artifact>/<version>``
and reused from there. The alias (``latest``, ``staging``, ``v3``) is resolved to a concrete
version first, so a moved alias fetches the new version and an unchanged one hits the cache.
Tests pass a fake ``api`` object; nothing here reaches the network by itself.
"""

from __future__ import annotations

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


def resolve_lora(
    lora: str | None, cache_dir: str | os.PathLike[str], api: Any = None
) -> str | None:
    """A local LoRA path for ``lora``: paths are checked and returned, ``wandb://`` references
    are downloaded (once) into ``cache_dir``. ``api`` defaults to ``wandb.Api()``."""
    if not lora:
        return None
    if not lora.startswith(SCHEME):
        try:
            resolve_lora_file(lora)
        except FileNotFoundError as e:
            raise CVGenError(str(e)) from None
        return lora
    entity, project, name, alias = parse_ref(lora)
    if api is None:
        import wandb

        api = wandb.Api()
    try:
        artifact = api.artifact(f"{entity}/{project}/{name}:{alias}", type="lora")
    except Exception as e:  # the W&B client raises many types (CommError, ValueError, ...)
        raise CVGenError(f"{lora}: cannot resolve the W&B artifact: {e}") from e
    version = str(getattr(artifact, "version", None) or alias)
    target = Path(cache_dir).expanduser() / entity / project / name / version
    if not _complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        try:
            artifact.download(root=str(tmp))
            (tmp / ".complete").write_text(f"{entity}/{project}/{name}:{version}\n")
            if target.exists():  # an incomplete earlier download
                shutil.rmtree(target)
            os.replace(tmp, target)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, CVGenError):
                raise
            raise CVGenError(f"{lora}: download failed: {e}") from e
    try:
        resolve_lora_file(target)
    except FileNotFoundError as e:
        raise CVGenError(f"{lora}: the artifact holds no LoRA weights ({e})") from None
    return str(target)


def resolve_loras(cfg: ServeConfig, api: Any = None) -> ServeConfig:
    """``cfg`` with every LoRA a local path (``wandb://`` references downloaded once), each
    checked against the base model (one line for a LoRA made for another base), listed under
    ``loras`` (a lone ``lora: X`` becomes ``loras: {default: X}``)."""
    resolved = {}
    for name, ref in cfg.lora_map.items():
        try:
            path = resolve_lora(ref, cfg.wandb_cache_dir, api)
            assert path is not None
            check_lora_fits(cfg.base, path)
        except CVGenError as e:
            if not cfg.loras:
                raise
            raise CVGenError(f"loras.{name}: {e}") from None
        resolved[name] = path
    return cfg.model_copy(update={"lora": None, "loras": resolved})


def _complete(path: Path) -> bool:
    return (path / ".complete").is_file()
