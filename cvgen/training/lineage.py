"""W&B lineage of a training run: data -> run -> LoRA -> registry.

- The training data is an input of the run: a ``dataset`` artifact that points at the DVC
  remote's copy of the data (``<remote>/files/md5/ab/cdef….dir``, a reference W&B does not
  download or hash) and carries the DVC md5 in its metadata, so W&B's lineage graph starts at
  the exact data version. The same md5 and remote give the same artifact (one version).
- The LoRA is an output: an artifact of type ``lora`` whose metadata holds the evaluation
  metrics (``metrics``: the last validation loss; ``cvgen.registry`` reads them when
  promoting), the step and the data version; linked to a registry collection when the config
  names one (``export.registry``).

W&B offline mode (no credentials) logs the LoRA artifact but cannot record inputs or registry
links (the client refuses both offline); each step that is skipped says so in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cvgen.data.version import DataVersion, dvc_root, remote_location
from cvgen.registry import LORA_TYPE, METRICS_KEY

DATA_FILE = "dvc.json"  # inside the dataset artifact: where the data is and which md5


def wandb_runs(trainer: Any) -> list[Any]:
    """The W&B runs of the trainer's ``WandbLogger`` loggers."""
    return [lg.experiment for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]


def data_record(version: DataVersion, remote: str | None) -> dict[str, Any]:
    """What the dataset artifact says about the data: md5, path in the DVC repo, the ``.dvc``
    file or lock stage recording it, and its place on the remote (None: not resolvable)."""
    root = dvc_root(version.tracked)

    def rel(path: str) -> str:
        return os.path.relpath(path, root) if root is not None else path

    file, _, stage = version.source.partition(":")
    return {
        "md5": version.md5,
        "path": rel(version.tracked),
        "recorded_in": rel(file) + (f":{stage}" if stage else ""),
        "remote": remote,
    }


def dataset_artifact(name: str, record: dict[str, Any]) -> Any:
    """A ``dataset`` artifact for ``record`` (:func:`data_record`): a reference to the remote
    copy when there is one, and the record itself as ``dvc.json`` and metadata."""
    import wandb

    artifact = wandb.Artifact(name, type="dataset", metadata=record)
    with artifact.new_file(DATA_FILE) as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
    if record.get("remote"):
        try:  # no download, no hashing: the md5 in the path names the content
            artifact.add_reference(record["remote"], name="dvc-remote", checksum=False)
        except Exception as e:  # e.g. gs:// without google-cloud-storage, or no credentials
            print(f"cvgen: the dataset artifact records the remote without a reference: {e}")
    return artifact


def log_data_input(trainer: Any, name: str) -> str | None:
    """Record the training data as an input of the W&B run(s); returns what happened (one
    line), or None without a W&B logger."""
    runs = wandb_runs(trainer)
    if not runs:
        return None
    dm = getattr(trainer, "datamodule", None)
    info = getattr(dm, "data_version_info", None)
    if not info:
        return "cvgen: no data lineage: the training data is not tracked by DVC"
    version = DataVersion(**info)
    record = data_record(version, remote_location(version))
    for run in runs:
        if getattr(run, "offline", False):
            return "cvgen: W&B is offline: the data input (lineage) is recorded by online runs only"
        run.use_artifact(dataset_artifact(name, record))
    where = record["remote"] or "no DVC remote configured"
    return f"cvgen: data input {name}: md5 {version.md5} ({where})"


def lora_metadata(trainer: Any, metrics: dict[str, float], step: int | None) -> dict[str, Any]:
    """The LoRA artifact's metadata: step, evaluation metrics (and the step they were measured
    at) and the data version."""
    dm = getattr(trainer, "datamodule", None)
    return {
        "global_step": trainer.global_step,
        METRICS_KEY: dict(metrics),
        "metrics_step": step,
        "data_version": getattr(dm, "data_version", None),
    }


def log_lora(
    trainer: Any,
    folder: Path,
    name: str,
    metadata: dict[str, Any],
    registry: str | None = None,
) -> list[str]:
    """Log ``folder`` as the LoRA artifact ``name`` (aliases ``latest``, ``step-N``) and link it
    to ``registry`` (``wandb-registry-model/COLLECTION``); returns the lines to print."""
    import wandb

    lines = []
    for run in wandb_runs(trainer):
        artifact = wandb.Artifact(name, type=LORA_TYPE, metadata=metadata)
        artifact.add_dir(str(folder))
        run.log_artifact(artifact, aliases=["latest", f"step-{trainer.global_step}"])
        if not registry:
            continue
        if getattr(run, "offline", False):
            lines.append(
                f"cvgen: W&B is offline: the LoRA is not linked to {registry} (online runs only)"
            )
            continue
        linked = run.link_artifact(artifact, registry)
        where = getattr(linked, "qualified_name", None) or registry
        lines.append(f"cvgen: LoRA linked to {where}")
    return lines
