"""A built wheel, installed in a fresh venv outside the repository, runs the README's demo
commands from a folder made by ``cvgen init``: nothing but the wheel is needed.

The default test installs the wheel alone (``--no-deps``) and lends the fresh venv this
environment's third-party packages through a ``.pth`` line (entries of a ``.pth`` file are plain
path entries: this environment's own editable cvgen stays invisible). The slow test installs the
wheel with its ``train`` extra from the package index, as a user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

DEMO = [
    ["init", "."],
    ["model", "random", "--arch", "tiny", "--out", "models/tiny"],
    ["data", "sample", "--out", "data/sample"],
    [
        "fit",
        "--config",
        "configs/demo.yaml",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ],
]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the work tree (the build leaves the checkout untouched)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    src = tmp_path_factory.mktemp("src")
    for rel in listed:
        origin = repo_root / rel
        if not origin.exists() and not origin.is_symlink():
            continue  # deleted in the work tree
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            dest.symlink_to(os.readlink(origin))
        else:
            shutil.copy2(origin, dest)
    dist = tmp_path_factory.mktemp("dist")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        cwd=src,
        env=dict(os.environ),
    )
    (found,) = dist.glob("cvgen-*.whl")
    return found


def _fresh_venv(where: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    return where / "bin"


def _env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


def _check_demo(bin_dir: Path, work: Path, env: dict[str, str]) -> None:
    where = _run([str(bin_dir / "python"), "-c", "import cvgen; print(cvgen.__file__)"], work, env)
    assert str(bin_dir.parent) in where, f"cvgen was not imported from the fresh venv: {where}"
    for args in DEMO:
        _run([str(bin_dir / "cvgen"), *args], work, env)
    configs = {p.name for p in (work / "configs").iterdir()}
    assert configs >= {"demo.yaml", "lora.yaml", "serve.yaml", "looks.yaml"}
    lora = work / "runs" / "demo" / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    assert (lora / "cvgen_lora.json").is_file()


def test_wheel_ships_configs_and_runs_the_demo_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for config in ("demo.yaml", "lora.yaml", "serve.yaml", "looks.yaml"):
        assert f"cvgen/configs/{config}" in names
    bin_dir = _fresh_venv(tmp_path / "venv")
    env = _env(bin_dir)
    _run(
        [str(bin_dir / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        tmp_path,
        env,
    )
    # this environment's dependencies, as plain path entries (no editable cvgen through them)
    purelib = Path(
        subprocess.run(
            [
                str(bin_dir / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (purelib / "_cvgen_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "work"
    work.mkdir()
    _check_demo(bin_dir, work, env)


@pytest.mark.slow
def test_wheel_with_its_train_extra_from_the_index(wheel: Path, tmp_path: Path) -> None:
    bin_dir = _fresh_venv(tmp_path / "venv")
    env = _env(bin_dir)
    torch_pin = os.environ.get("CVGEN_TEST_TORCH", "torch==2.14.1")
    _run([str(bin_dir / "pip"), "install", "-q", torch_pin], tmp_path, env, timeout=3600)
    _run([str(bin_dir / "pip"), "install", "-q", f"{wheel}[train]"], tmp_path, env, timeout=3600)
    work = tmp_path / "work"
    work.mkdir()
    _check_demo(bin_dir, work, env)
