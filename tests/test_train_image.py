"""The training image's entrypoint (docker/train-entrypoint.sh), run here in a folder laid out as
docker/train.Dockerfile lays out /app: no git, the DVC project files, the configs. It pulls the
data from a DVC remote and trains (no Docker daemon here; CI builds the image itself)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy_files import DOCKER, ROOT, instructions

ENTRYPOINT = DOCKER / "train-entrypoint.sh"


def image_workdir(tmp: Path) -> Path:
    """What train.Dockerfile copies under its WORKDIR /app (the package is installed already)."""
    app = tmp / "app"
    app.mkdir()
    for ins in instructions(DOCKER / "train.Dockerfile"):
        if ins.cmd != "COPY" or ins.flags:
            continue
        *sources, dest = ins.value
        if dest.startswith("/") or sources == ["cvgen"]:
            continue  # outside /app (the entrypoint itself) or the installed package
        for src in sources:
            target = app / dest / Path(src).name if dest.endswith("/") else app / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target)
            else:
                shutil.copy2(ROOT / src, target)
    return app


def entrypoint(app: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    bin_dir = str(Path(sys.executable).parent)  # cvgen, dvc and python of this venv
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "DVC_SITE_CACHE_DIR": str(app.parent / "dvc-site"),
        **env,
    }
    full_env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], cwd=app, env=full_env, capture_output=True, text=True
    )


def dvc(app: Path, *args: str) -> None:
    env = {**os.environ, "DVC_SITE_CACHE_DIR": str(app.parent / "dvc-site")}
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=app, env=env, check=True)


def test_layout_is_the_repository_dvc_project(tmp_path: Path) -> None:
    app = image_workdir(tmp_path)
    for name in (
        "dvc.yaml",
        "dvc.lock",
        "params.yaml",
        "data.dvc",
        ".dvc/config",
        "configs/lora.yaml",
    ):
        assert (app / name).is_file(), name
    assert not (app / ".git").exists()


def test_missing_data_on_the_remote_is_one_clear_error(tmp_path: Path) -> None:
    """The default target is the prepare stage's output that the committed dvc.lock records."""
    app = image_workdir(tmp_path)
    (tmp_path / "empty-remote").mkdir()
    out = entrypoint(
        app, "--config", "configs/lora.yaml", CVGEN_DVC_REMOTE=str(tmp_path / "empty-remote")
    )
    assert out.returncode == 2, out.stderr
    assert "cvgen-train: dvc pull prepare from job" in out.stderr
    assert (
        "error: dvc pull prepare failed: push the data first (make repro && make data-push"
        in out.stderr
    )
    assert "no_scm = true" in (app / ".dvc" / "config.local").read_text()


def test_pulls_the_data_and_trains(tmp_path: Path, tiny_model: Path, sample_data: Path) -> None:
    app = image_workdir(tmp_path)
    remote = tmp_path / "remote"
    # someone pushed a data set of their own (data/prepared is the pipeline's output, which
    # `dvc add` refuses): tracked, pushed, then gone from this machine
    dvc(app, "config", "--local", "core.no_scm", "true")
    shutil.copytree(sample_data, app / "data" / "mine")
    dvc(app, "add", "-q", "data/mine")
    dvc(app, "remote", "add", "--local", "pushed", str(remote))
    dvc(app, "push", "-q", "-r", "pushed", "data/mine.dvc")
    md5 = yaml.safe_load((app / "data" / "mine.dvc").read_text())["outs"][0]["md5"]
    shutil.rmtree(app / "data" / "mine")
    shutil.rmtree(app / ".dvc" / "cache")
    (app / ".dvc" / "config.local").unlink()

    run_dir = tmp_path / "runs" / "job"
    out = entrypoint(
        app,
        "--config", "configs/demo.yaml",
        "--model.base", str(tiny_model),
        "--data.root", "data/mine",
        "--trainer.max_steps", "1",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", "ignored",  # CVGEN_RUN_DIR wins
        CVGEN_DVC_REMOTE=str(remote),
        CVGEN_DVC_TARGETS="data/mine.dvc",
        CVGEN_RUN_DIR=str(run_dir),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cvgen: trained 1 steps" in out.stdout + out.stderr
    info = json.loads((run_dir / "lora" / "cvgen_lora.json").read_text())
    assert info["data_version"] == md5  # the pulled data's DVC version, recorded with the LoRA
    assert not (app / "ignored").exists()


def test_a_secret_that_cannot_be_read_stops_the_start(tmp_path: Path) -> None:
    app = image_workdir(tmp_path)
    out = entrypoint(app, WANDB_API_KEY_SECRET="wandb-api-key", GCE_METADATA_HOST="127.0.0.1:9")
    assert out.returncode != 0
    assert "cvgen.gcpsecret: error: metadata server 127.0.0.1:9" in out.stderr
    assert not (app / ".dvc" / "config.local").exists()  # it stopped before anything else


@pytest.mark.parametrize(
    "var", ["CVGEN_DVC_REMOTE", "CVGEN_DVC_TARGETS", "CVGEN_RUN_DIR", "WANDB_API_KEY_SECRET"]
)
def test_documented_variables_are_read(var: str) -> None:
    text = ENTRYPOINT.read_text()
    assert f"#   {var}" in text and f"${{{var}" in text
