"""Promotion of LoRA versions through W&B aliases (``staging``, ``production``).

Training logs each exported LoRA as a W&B artifact of type ``lora`` whose metadata holds its
evaluation metrics under ``metrics`` (``{"val/loss": 0.11, ...}``) and, when the config names
a registry collection (``export.registry``), links it there. :func:`promote` moves an alias
of that collection to one version, after checking that the version's metric is present and no
worse than the metric of the version holding the alias now. The server loads the alias
(``cvgen serve --lora wandb://ORG/wandb-registry-model/COLLECTION:production``), so promotion
is what changes the model a deployment serves.

Everything goes through a W&B API object (``wandb.Api()`` unless one is passed): tests pass a
fake one, so nothing here needs the network by itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from cvgen.errors import CVGenError

METRICS_KEY = "metrics"  # artifact metadata: {metric name: value}
LORA_TYPE = "lora"
ALIASES = ("staging", "production")
Mode = Literal["min", "max"]


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote` did: ``alias`` now on ``name:version``; ``previous`` is the version
    that held it before (None: nobody), with the metric values compared."""

    alias: str
    name: str  # entity/project/collection
    version: str
    metric: str
    value: float | None
    previous: str | None
    previous_value: float | None
    forced: bool
    changed: bool  # False: the version already held the alias

    def line(self) -> str:
        """The one line ``cvgen promote`` prints."""
        value = "missing" if self.value is None else f"{self.value:.6g}"
        head = f"{self.alias} -> {self.name}:{self.version} ({self.metric} {value})"
        if not self.changed:
            return f"{head}: it already holds {self.alias}, nothing to do"
        if self.previous is None:
            return f"{head}; no version held {self.alias} before"
        prev = "missing" if self.previous_value is None else f"{self.previous_value:.6g}"
        forced = ", forced" if self.forced else ""
        return f"{head}; was {self.previous} ({self.metric} {prev}{forced})"


def split_ref(ref: str) -> tuple[str, str]:
    """(``entity/project/name``, version or alias) of a LoRA reference: ``wandb://e/p/n:v3``,
    or the same without the scheme (a registry path ``ORG/wandb-registry-model/n:v3``)."""
    from cvgen.serve.wandb_lora import SCHEME, parse_ref

    entity, project, name, version = parse_ref(ref if ref.startswith(SCHEME) else SCHEME + ref)
    if ":" not in ref.rsplit("/", 1)[-1]:
        raise CVGenError(f"{ref}: name a version or alias (…/{name}:v3 or …/{name}:staging)")
    return f"{entity}/{project}/{name}", version


def metric_of(artifact: Any, metric: str) -> float | None:
    """The finite value of ``metric`` in the artifact's ``metrics`` metadata, else None."""
    metrics = (getattr(artifact, "metadata", None) or {}).get(METRICS_KEY) or {}
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fetch(api: Any, name: str, what: str) -> Any:
    try:
        return api.artifact(name)
    except Exception as e:  # the W&B client raises many types (CommError, ValueError, ...)
        raise CVGenError(f"{what} {name}: cannot resolve the W&B artifact: {e}") from e


def promote(
    api: Any,
    ref: str,
    alias: str,
    metric: str = "val/loss",
    mode: Mode = "min",
    force: bool = False,
) -> Promotion:
    """Move ``alias`` of ``ref``'s collection to the version ``ref`` names.

    Refused (a :class:`CVGenError` of one line) unless ``force``: a version whose ``metric`` is
    missing, or worse than the current holder's (higher with ``mode="min"``, lower with
    ``"max"``); an artifact that is not a LoRA. A holder without the metric does not block.
    """
    if mode not in ("min", "max"):
        raise CVGenError(f"--mode must be min or max, got {mode!r}")
    if not alias or ":" in alias or "/" in alias:
        raise CVGenError(f"--alias must be a plain name such as staging, got {alias!r}")
    name, version = split_ref(ref)
    candidate = _fetch(api, f"{name}:{version}", "LoRA")
    kind = getattr(candidate, "type", LORA_TYPE)
    if kind != LORA_TYPE and not force:
        raise CVGenError(f"{name}:{version} is a {kind!r} artifact, not a LoRA ({LORA_TYPE!r})")
    concrete = str(getattr(candidate, "version", version))
    value = metric_of(candidate, metric)
    if value is None and not force:
        raise CVGenError(
            f"{name}:{concrete} has no {metric} in its metadata ({METRICS_KEY}); evaluate it "
            "first or pass --force"
        )
    holder = (
        _fetch(api, f"{name}:{alias}", "alias") if api.artifact_exists(f"{name}:{alias}") else None
    )
    previous = str(getattr(holder, "version", "?")) if holder is not None else None
    previous_value = metric_of(holder, metric) if holder is not None else None
    result = Promotion(
        alias, name, concrete, metric, value, previous, previous_value, force, previous != concrete
    )
    if not result.changed:
        return result
    if value is not None and previous_value is not None and not force:
        worse = value > previous_value if mode == "min" else value < previous_value
        if worse:
            raise CVGenError(
                f"{name}:{concrete} has {metric} {value:.6g}, worse than {previous_value:.6g} of "
                f"{previous} which holds {alias} ({'lower' if mode == 'min' else 'higher'} is "
                "better); pass --force to promote it anyway"
            )
    # an alias names one version of a collection: adding it here moves it from the holder
    candidate.aliases = [*(a for a in candidate.aliases if a != alias), alias]
    try:
        candidate.save()
    except Exception as e:
        raise CVGenError(f"{name}:{concrete}: could not set alias {alias}: {e}") from e
    return result


def record_metrics(api: Any, ref: str, metrics: dict[str, float | None]) -> dict[str, float]:
    """Merge ``metrics`` (None values skipped) into the ``metrics`` metadata of the LoRA version
    ``ref`` names and save it; returns the merged metrics. ``scripts/evaluate.py --wandb``
    records its img2img scores this way, so ``cvgen promote --metric img2img/ssim`` can use them."""
    name, version = split_ref(ref)
    artifact = _fetch(api, f"{name}:{version}", "LoRA")
    metadata = dict(getattr(artifact, "metadata", None) or {})
    merged = dict(metadata.get(METRICS_KEY) or {})
    merged.update({k: float(v) for k, v in metrics.items() if v is not None})
    artifact.metadata = {**metadata, METRICS_KEY: merged}
    try:
        artifact.save()
    except Exception as e:
        raise CVGenError(f"{name}:{version}: could not save its metrics: {e}") from e
    return merged
