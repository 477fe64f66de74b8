"""DVC: a round trip through a local remote, the repo's own DVC files, and (slow) `dvc repro`."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cvgen.data.version import find_data_version


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    home = tmp_path / "home"
    home.mkdir()
    e.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site"),
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system"),
        HOME=str(home),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        GIT_CONFIG_NOSYSTEM="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return e


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 120) -> str:
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else args
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_dvc_round_trip_through_a_local_remote(
    sample_data: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    repo, remote, clone = tmp_path / "repo", tmp_path / "remote", tmp_path / "clone"
    repo.mkdir()
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    run(["dvc", "remote", "add", "-d", "local", str(remote)], repo, env)
    shutil.copytree(sample_data, repo / "data" / "portraits")
    run(["dvc", "add", "-q", "data/portraits"], repo, env)
    run(["dvc", "push", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "data"], repo, env)

    md5 = yaml.safe_load((repo / "data" / "portraits.dvc").read_text())["outs"][0]["md5"]
    v = find_data_version(repo / "data" / "portraits")
    assert v is not None and v.md5 == md5

    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "data" / "portraits").exists()  # git holds the pointer, not the photos
    run(["dvc", "pull", "-q"], clone, env)
    cmp = filecmp.dircmp(repo / "data" / "portraits", clone / "data" / "portraits")
    assert not cmp.left_only and not cmp.right_only
    names = [
        p.relative_to(repo / "data" / "portraits")
        for p in (repo / "data" / "portraits").rglob("*")
        if p.is_file()
    ]
    assert len(names) == 9  # 8 photos + metadata.jsonl
    match, mismatch, errors = filecmp.cmpfiles(
        repo / "data" / "portraits",
        clone / "data" / "portraits",
        [str(n) for n in names],
        shallow=False,
    )
    assert (len(match), mismatch, errors) == (9, [], [])
    cloned = find_data_version(clone / "data" / "portraits")
    assert cloned is not None and cloned.md5 == md5


def test_repo_dvc_files(repo_root: Path) -> None:
    data_dvc = yaml.safe_load((repo_root / "data.dvc").read_text())
    [out] = data_dvc["outs"]
    # data.dvc tracks the source photos; the pipeline derives everything else from them
    assert out["path"] == "data/raw" and out["md5"].endswith(".dir")
    config = (repo_root / ".dvc" / "config").read_text()
    assert "remote = local" in config and "url = ../.dvc-remote" in config  # offline default
    pipeline = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    stages = pipeline["stages"]
    assert list(stages) == ["model", "prepare", "fit", "evaluate"]
    assert "data/raw" in stages["prepare"]["deps"]
    assert "${fit.config}" in stages["fit"]["deps"] and "data/prepared" in stages["fit"]["deps"]
    assert "cvgen data prepare" in stages["prepare"]["cmd"]
    assert any("eval/metrics.json" in m for m in stages["evaluate"]["metrics"])
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert (repo_root / params["fit"]["config"]).is_file()
    # the committed lock prepared the photos data.dvc tracks, and the metrics name that data
    lock = yaml.safe_load((repo_root / "dvc.lock").read_text())
    raw = next(d for d in lock["stages"]["prepare"]["deps"] if d["path"] == "data/raw")
    assert raw["md5"] == out["md5"]
    prepared = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    metrics = json.loads((repo_root / "eval" / "metrics.json").read_text())
    assert metrics["data_version"] == prepared["md5"] and metrics["val_loss"] > 0


def stale_stages(repo_root: Path, env: dict[str, str]) -> list[str]:
    """What makes dvc.lock disagree with the code and parameters in the workspace.

    ``dvc status`` compares each stage's deps, params and command with the lock. Data that
    stages produce (and the photos data.dvc tracks) is left out there, since a fresh clone does
    not have it; instead, each stage's input data must have the md5 that the stage or .dvc
    file producing it records, so the lock agrees with itself.
    """
    lock = yaml.safe_load((repo_root / "dvc.lock").read_text())
    made: dict[str, tuple[str, str]] = {}  # path -> (md5, who records it)
    for name, stage in lock["stages"].items():
        for o in stage.get("outs", []):
            made[o["path"]] = (o["md5"], f"stage {name!r}")
    for o in yaml.safe_load((repo_root / "data.dvc").read_text())["outs"]:
        made[o["path"]] = (o["md5"], "data.dvc")
    defined = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    stale = [
        f"stage {name!r}: in dvc.lock but no longer in dvc.yaml"
        for name in lock["stages"]
        if name not in defined
    ]
    status = json.loads(run(["dvc", "status", "--json"], repo_root, env) or "{}")
    for name, changes in status.items():
        if name.endswith(".dvc"):
            continue  # the tracked photos themselves: absent from a fresh clone
        for change in changes:
            if change == "changed command":
                stale.append(f"stage {name!r}: its command changed")
            elif isinstance(change, dict):
                for path, what in change.get("changed deps", {}).items():
                    if path not in made:
                        stale.append(f"stage {name!r}: {path} {what}")
    for name, stage in lock["stages"].items():
        for dep in stage.get("deps", []):
            if dep["path"] in made and dep.get("md5") != made[dep["path"]][0]:
                stale.append(
                    f"stage {name!r}: its {dep['path']} is not the one {made[dep['path']][1]} records"
                )
    return stale


def test_dvc_lock_is_current(repo_root: Path, env: dict[str, str]) -> None:
    """dvc.lock matches the code, parameters and commands of dvc.yaml: a fresh clone's
    `dvc repro` would rebuild exactly what the lock says, not run stages that look changed."""
    stale = stale_stages(repo_root, env)
    assert not stale, "dvc.lock is stale; run `make repro` and commit dvc.lock:\n" + "\n".join(
        stale
    )


def test_dvc_understands_the_pipeline(repo_root: Path, env: dict[str, str]) -> None:
    listed = run(["dvc", "stage", "list"], repo_root, env)
    for name in ("model", "prepare", "fit", "evaluate"):
        assert name in listed
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo_root, env))
    assert "val_loss" in json.dumps(shown)


@pytest.mark.slow
def test_dvc_repro_end_to_end(repo_root: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """A fresh clone of the committed repo: rebuild the source photos as `make data/raw` does
    without a remote, check they are the ones data.dvc tracks, then `dvc repro`
    (model, prepare -> fit -> evaluate) must reproduce the committed lock."""
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo_root), str(clone)], tmp_path, env)
    committed = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert stale_stages(clone, env) == []
    cvgen = str(Path(sys.executable).parent / "cvgen")
    run([cvgen, "data", "sample", "--out", "data/raw", "--size", "512"], clone, env)
    # recording the rebuilt photos in DVC's cache leaves data.dvc as it was: the same md5
    tracked = (clone / "data.dvc").read_text()
    run(["dvc", "commit", "-f", "-q", "data.dvc"], clone, env)
    assert (clone / "data.dvc").read_text() == tracked
    assert json.loads(run(["dvc", "status", "--json", "data.dvc"], clone, env) or "{}") == {}
    run(["dvc", "repro"], clone, env, timeout=1200)
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    for name in ("model", "prepare"):  # deterministic stages: the same outputs, byte for byte
        assert lock[name] == committed[name], name
    run_dirs = {o["path"] for o in lock["fit"]["outs"]}  # a run folder holds timestamps

    def inputs(stage: dict[str, Any]) -> tuple[object, object]:
        return [d for d in stage["deps"] if d["path"] not in run_dirs], stage["params"]

    for name in ("fit", "evaluate"):  # the same code, data and parameters
        assert inputs(lock[name]) == inputs(committed[name]), name
    assert json.loads(run(["dvc", "status", "--json"], clone, env) or "{}") == {}
    prepared = next(o for o in lock["prepare"]["outs"] if o["path"] == "data/prepared")
    metrics = json.loads((clone / "eval" / "metrics.json").read_text())
    assert metrics["data_version"] == prepared["md5"]
    assert metrics["held_out_images"] == 2 and metrics["val_loss"] > 0
    lora_info = json.loads((clone / "runs" / "dvc" / "lora" / "cvgen_lora.json").read_text())
    assert lora_info["data_version"] == prepared["md5"]
    shown = run(["dvc", "plots", "show", "--json"], clone, env)
    assert "train_loss" in shown
