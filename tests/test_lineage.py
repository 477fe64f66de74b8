"""W&B lineage: the training data (its DVC md5 on the DVC remote) as the run's input, the LoRA
as its output with evaluation metrics, linked to a registry collection.

A real DVC repo with a local remote holds the data; a fake W&B run records what the training
side asks of it (the real client refuses inputs and links offline, which is also tested).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cvgen.data.version import find_data_version, remote_location
from cvgen.registry import METRICS_KEY
from cvgen.training import lineage


def dvc(cwd: Path, *args: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(cwd / ".dvc-site")}
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, check=True)


@pytest.fixture(scope="module")
def dvc_repo(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVC repo (no git) whose data/prepared is tracked and pushed to a local remote."""
    root = tmp_path_factory.mktemp("dvcrepo") / "repo"
    root.mkdir()
    dvc(root, "init", "--no-scm", "-q")
    shutil.copytree(sample_data, root / "data" / "prepared")
    dvc(root, "remote", "add", "-d", "store", "../remote")
    dvc(root, "add", "-q", "data/prepared")
    dvc(root, "push", "-q")
    return root


class FakeRun:
    def __init__(self, offline: bool = False) -> None:
        self.offline = offline
        self.used: list[Any] = []
        self.logged: list[tuple[Any, list[str]]] = []
        self.linked: list[tuple[Any, str]] = []

    def use_artifact(self, artifact: Any) -> Any:
        self.used.append(artifact)
        return artifact

    def log_artifact(self, artifact: Any, aliases: list[str]) -> Any:
        self.logged.append((artifact, aliases))
        return artifact

    def link_artifact(self, artifact: Any, target: str) -> Any:
        self.linked.append((artifact, target))
        return SimpleNamespace(qualified_name=f"acme/{target}:v0")


class WandbLogger:  # what lineage looks for among the trainer's loggers
    def __init__(self, run: FakeRun) -> None:
        self.experiment = run


def trainer_with(run: FakeRun, data_root: Path | None, step: int = 7) -> Any:
    version = find_data_version(data_root) if data_root else None
    dm = SimpleNamespace(
        data_version=version.md5 if version else None,
        data_version_info=version.as_dict() if version else None,
    )
    return SimpleNamespace(loggers=[WandbLogger(run)], datamodule=dm, global_step=step)


def test_remote_location_is_the_pushed_copy(dvc_repo: Path) -> None:
    version = find_data_version(dvc_repo / "data" / "prepared")
    assert version is not None and version.md5.endswith(".dir")
    uri = remote_location(version)
    assert uri is not None and uri.startswith("file://")
    pushed = Path(uri.removeprefix("file://"))
    assert pushed.is_file(), "the remote has no object at the location recorded for lineage"
    assert pushed.parent.name == version.md5[:2] and pushed.name == version.md5[2:]
    assert pushed.parts[-4:-2] == ("files", "md5")  # DVC 3's remote layout


def test_remote_location_without_remote_or_dvc(dvc_repo: Path, tmp_path: Path) -> None:
    version = find_data_version(dvc_repo / "data" / "prepared")
    assert version is not None
    assert remote_location(version, remote="nonexistent") is None
    elsewhere = version.__class__(version.md5, version.source, str(tmp_path))
    assert remote_location(elsewhere) is None  # no DVC repo above: no location, no error


def test_data_input_points_at_the_remote_with_its_md5(dvc_repo: Path) -> None:
    run = FakeRun()
    line = lineage.log_data_input(trainer_with(run, dvc_repo / "data" / "prepared"), "cvgen-data")
    (artifact,) = run.used
    version = find_data_version(dvc_repo / "data" / "prepared")
    assert version is not None and line is not None and version.md5 in line
    assert artifact.type == "dataset" and artifact.name == "cvgen-data"
    meta = artifact.metadata
    assert meta["md5"] == version.md5
    assert meta["path"] == "data/prepared" and meta["recorded_in"] == "data/prepared.dvc"
    refs = {e.path: e.ref for e in artifact.manifest.entries.values()}
    assert refs["dvc-remote"] == meta["remote"] == remote_location(version)
    assert (
        json.loads(Path(artifact.manifest.entries[lineage.DATA_FILE].local_path).read_text())
        == meta
    )


def test_same_data_gives_the_same_dataset_artifact(dvc_repo: Path) -> None:
    first, second = FakeRun(), FakeRun()
    for run in (first, second):
        lineage.log_data_input(trainer_with(run, dvc_repo / "data" / "prepared"), "cvgen-data")
    assert first.used[0].manifest.digest() == second.used[0].manifest.digest()


def test_untracked_data_and_offline_runs_record_no_input(dvc_repo: Path, tmp_path: Path) -> None:
    run = FakeRun()
    line = lineage.log_data_input(trainer_with(run, tmp_path), "cvgen-data")
    assert line is not None and "not tracked by DVC" in line and not run.used
    offline = FakeRun(offline=True)
    line = lineage.log_data_input(trainer_with(offline, dvc_repo / "data" / "prepared"), "d")
    assert line is not None and "offline" in line and not offline.used
    no_wandb = SimpleNamespace(loggers=[], datamodule=None)
    assert lineage.log_data_input(no_wandb, "d") is None


def test_lora_is_logged_with_metrics_and_linked(tmp_path: Path, random_lora: Path) -> None:
    run = FakeRun()
    trainer = trainer_with(run, None, step=12)
    meta = lineage.lora_metadata(trainer, {"val/loss": 0.25}, 10)
    assert meta == {
        "global_step": 12,
        METRICS_KEY: {"val/loss": 0.25},
        "metrics_step": 10,
        "data_version": None,
    }
    lines = lineage.log_lora(
        trainer, random_lora.parent, "cvgen-lora", meta, "wandb-registry-model/x"
    )
    ((artifact, aliases),) = run.logged
    assert artifact.type == "lora" and artifact.metadata[METRICS_KEY] == {"val/loss": 0.25}
    assert aliases == ["latest", "step-12"]
    assert any(p.endswith(".safetensors") for p in artifact.manifest.entries)
    assert run.linked == [(artifact, "wandb-registry-model/x")]
    assert lines == ["cvgen: LoRA linked to acme/wandb-registry-model/x:v0"]


def test_offline_lora_is_logged_but_not_linked(random_lora: Path) -> None:
    run = FakeRun(offline=True)
    lines = lineage.log_lora(
        trainer_with(run, None), random_lora.parent, "l", {}, "wandb-registry-model/x"
    )
    assert len(run.logged) == 1 and not run.linked
    assert "offline" in lines[0] and "not linked" in lines[0]
