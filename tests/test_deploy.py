"""The deploy files in docker/ agree with the code, so a renamed flag, key, variable or file breaks
a test here rather than a deploy: every file parses (gcloud's own loaders where gcloud is
installed), every substitution and variable has a definition, every file they name exists and
is uploaded, every `cvgen` command line parses with the real CLI, and every environment
variable they set is one the code reads. Scripts run with stub `gcloud` / `docker` commands that
record how they are called. (No Docker daemon here: the images themselves are built in CI.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from cvgen.serve.cli import _health_url, add_parser, config_from_args
from cvgen.serve.config import ServeConfig
from cvgen.training.cli import run_cli
from tests.deploy_files import (
    CLOUD_BUILD_BUILTINS,
    DOCKER,
    ROOT,
    calls,
    code_reads,
    copy_sources,
    docker_ignored,
    dockerignore,
    gcloud_env,
    gcloud_schema,
    instructions,
    need,
    shell_undefined,
    strings,
    stub_bin,
    substitute,
    substitutions_used,
    unknown_flags,
)

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
SCRIPTS = sorted(DOCKER.glob("*.sh"))
SERVICES = [DOCKER / "cloudrun.yaml", DOCKER / "cloudrun-gpu.yaml"]
CLOUDBUILD = DOCKER / "cloudbuild.yaml"
PLACEHOLDERS = {
    "__IMAGE__": "europe-west4-docker.pkg.dev/p/cvgen/serve:b1",
    "__SERVICE_ACCOUNT__": "cvgen-serve@p.iam.gserviceaccount.com",
    "__LORA__": "wandb://acme/wandb-registry-model/cvgen-portraits:production",
    "__MODEL_BUCKET__": "p-cvgen",
    "__MODEL_PATH__": "models/sd15",
}
# set for the tools themselves, not for cvgen or its libraries
TOOL_ENV = {"PATH", "HOME", "DEBIAN_FRONTEND", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR"}
TOOL_ENV |= {"PIP_DISABLE_PIP_VERSION_CHECK"}
PLACEHOLDER = re.compile(r"__[A-Z_]+__|\$\{")
CLOUD_RUN_RESERVED = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}


def fit_parses(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """``cvgen fit ARGS --print_config`` with the real CLI (nothing is built or written)."""
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", *args, "--print_config"])
    assert info.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def serve_config(args: list[str]) -> ServeConfig:
    """What ``cvgen serve ARGS`` resolves to (the real parser and config loader)."""
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return config_from_args(parser.parse_args(["serve", *args]))


def render_service(path: Path) -> dict[str, Any]:
    text = path.read_text()
    for key, value in PLACEHOLDERS.items():
        text = text.replace(key, value)
    service = yaml.safe_load(text)
    left = [s for s in strings(service) if PLACEHOLDER.search(s)]
    assert not left, f"{path.name}: placeholders left: {left}"
    return service


def image_env(path: Path) -> dict[str, str]:
    """The ENV values a Dockerfile sets (ENV A=1 B=2 gives pairs)."""
    out = {}
    for ins in instructions(path):
        if ins.cmd == "ENV":
            out.update(zip(ins.value[::2], ins.value[1::2], strict=True))
    return out


# ---- Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_sources_exist_and_are_in_the_build_context(path: Path) -> None:
    patterns = dockerignore(path)
    for src in copy_sources(path):
        assert (ROOT / src).exists(), f"{path.name}: COPY {src}: no such file in the repository"
        assert not docker_ignored(src, patterns), f"{path.name}: COPY {src} is in its .dockerignore"
    ins = instructions(path)
    users = [i.value[0] for i in ins if i.cmd == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{path.name}: runs as root"


def test_dockerignore_matching_follows_docker() -> None:
    patterns = ["data", "**/__pycache__", ".dvc/cache", "runs/*/wandb"]
    assert docker_ignored("data/raw/a.jpg", patterns)
    assert not docker_ignored("cvgen/data/dataset.py", patterns)  # anchored at the root
    assert docker_ignored("cvgen/serve/__pycache__/x.pyc", patterns)
    assert docker_ignored(".dvc/cache/ab/cd", patterns) and not docker_ignored(
        ".dvc/config", patterns
    )
    assert docker_ignored("runs/demo/wandb/x", patterns) and not docker_ignored(
        "runs/demo/lora/x", patterns
    )


def test_train_image_runs_cvgen_fit_with_its_default_arguments(capsys) -> None:
    path = DOCKER / "train.Dockerfile"
    ins = {i.cmd: i for i in instructions(path)}
    assert ins["ENTRYPOINT"].value[-1] == "cvgen-train"
    copies = {i.value[-1]: i.value[0] for i in instructions(path) if i.cmd == "COPY"}
    assert copies["/usr/local/bin/cvgen-train"] == "docker/train-entrypoint.sh"
    assert "exec cvgen fit" in (DOCKER / "train-entrypoint.sh").read_text()
    printed = fit_parses(list(ins["CMD"].value), capsys)
    assert printed["data"]["root"] == "data/prepared"  # where the entrypoint's dvc pull puts it
    assert printed["trainer"]["accelerator"] == "gpu"


def test_serve_image_entrypoint_reads_base_and_lora() -> None:
    entry = " ".join(
        next(i for i in instructions(DOCKER / "serve.Dockerfile") if i.cmd == "ENTRYPOINT").value
    )
    assert '--base "$CVGEN_BASE"' in entry and '--lora "$CVGEN_LORA"' in entry


# ---- shell scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_defines_what_it_uses(path: Path) -> None:
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert shell_undefined(path.read_text()) == []
    assert path.stat().st_mode & 0o111, f"{path.name} is not executable"


def test_undefined_variables_are_found() -> None:
    assert shell_undefined('A=1\necho "$A $B ${C:-x} ${D:?set D}"\nread -r E <<< x\necho $E') == [
        "B"
    ]


# ---- Vertex AI and Compute Engine ------------------------------------------------------------

TRAIN_ENV = {
    "PROJECT": "my-project",
    "BUCKET": "my-bucket",
    "IMAGE": "europe-west4-docker.pkg.dev/my-project/cvgen/train:b1",
}


def run_script(name: str, tmp_path: Path, **env: str) -> list[list[str]]:
    stub_env, log = stub_bin(tmp_path, "gcloud")
    out = subprocess.run(
        ["bash", str(DOCKER / name)],
        env={**stub_env, **TRAIN_ENV, **env},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return calls(log)


def test_vertex_job_spec_is_filled_in_and_submitted(tmp_path: Path, capsys) -> None:
    (call,) = run_script("vertex-train.sh", tmp_path, RUN_NAME="r1")
    assert call[:4] == ["gcloud", "ai", "custom-jobs", "create"]
    if shutil.which("gcloud"):
        assert unknown_flags(call, ("gcloud", "ai", "custom-jobs", "create")) == []
    spec_file = next(tmp_path.glob("calls.log.0.*"))
    spec = yaml.safe_load(spec_file.read_text())
    assert not [v for v in strings(spec) if PLACEHOLDER.search(v)]
    pool = spec["workerPoolSpecs"][0]
    assert pool["machineSpec"] == {
        "machineType": "g2-standard-4",
        "acceleratorType": "NVIDIA_L4",
        "acceleratorCount": 1,
    }
    container = pool["containerSpec"]
    assert container["imageUri"] == TRAIN_ENV["IMAGE"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CVGEN_RUN_DIR"] == "/gcs/my-bucket/runs/r1"  # Vertex AI's bucket mount
    for name in env:
        assert code_reads(name), f"vertex-train.yaml sets {name}, which nothing reads"
    printed = fit_parses(
        [*container["args"], "--trainer.default_root_dir", env["CVGEN_RUN_DIR"]], capsys
    )
    assert printed["trainer"]["logger"]["init_args"]["name"] == "r1"


def test_vertex_spec_is_a_custom_job_spec_for_gcloud(tmp_path: Path) -> None:
    need("gcloud")
    run_script("vertex-train.sh", tmp_path)
    out = gcloud_schema("vertex", next(tmp_path.glob("calls.log.0.*")))
    assert out.returncode == 0 and out.stdout.strip() == "g2-standard-4", out.stderr


def test_compute_engine_recipe(tmp_path: Path, capsys) -> None:
    (call,) = run_script("gce-train.sh", tmp_path, RUN_NAME="r2")
    assert call[:4] == ["gcloud", "compute", "instances", "create"]
    opts = {a: call[i + 1] for i, a in enumerate(call) if a.startswith("--") and i + 1 < len(call)}
    assert opts["--machine-type"] == "g2-standard-4"
    assert opts["--accelerator"] == "type=nvidia-l4,count=1"
    assert opts["--maintenance-policy"] == "TERMINATE"  # GPU VMs cannot live-migrate
    startup = Path(opts["--metadata-from-file"].split("=", 1)[1])
    assert startup == DOCKER / "gce-startup.sh"
    delimiter, _, items = opts["--metadata"][1:].partition("^")
    metadata = dict(item.split("=", 1) for item in items.split(delimiter))
    used = {k for k in metadata if f"meta {k})" in startup.read_text()}
    assert used == set(metadata), "metadata keys the startup script does not read"
    args = metadata["cvgen-args"].split()
    assert fit_parses([*args, "--trainer.default_root_dir", "/runs/r2"], capsys)["model"]["base"]
    text = startup.read_text()
    for name in set(re_env_names(text)):
        assert code_reads(name), f"gce-startup.sh passes {name}, which nothing reads"
    (spot,) = run_script("gce-train.sh", tmp_path / "spot", SPOT="1")
    assert spot[spot.index("--provisioning-model") + 1] == "SPOT"
    if shutil.which("gcloud"):
        for c in (call, spot):
            assert unknown_flags(c, ("gcloud", "compute", "instances", "create")) == []


def re_env_names(text: str) -> list[str]:
    return re.findall(r"--env (\w+)=", text)


def test_startup_script_commands_exist(tmp_path: Path) -> None:
    text = (DOCKER / "gce-startup.sh").read_text()
    run_line = [w for w in text.replace("\\\n", " ").split() if w.startswith("--")]
    if shutil.which("docker"):
        docker_flags = [
            f for f in run_line if f in ("--rm", "--name", "--volume", "--device", "--env")
        ]
        assert unknown_flags(docker_flags, ("docker", "run")) == []
    if shutil.which("gcloud"):
        assert unknown_flags(["--recursive"], ("gcloud", "storage", "rsync")) == []


# ---- Cloud Run -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_cloud_run_service_matches_the_server(path: Path) -> None:
    service = render_service(path)
    template = service["spec"]["template"]
    spec = template["spec"]
    (container,) = spec["containers"]
    env_of_image = image_env(DOCKER / "serve.Dockerfile")
    # the command line the image runs: its ENTRYPOINT with CVGEN_BASE / CVGEN_LORA, then args
    env = {e["name"]: e for e in container["env"]}
    base, lora = env["CVGEN_BASE"]["value"], env["CVGEN_LORA"]["value"]
    cfg_file = ROOT / "cvgen" / "configs" / "serve.yaml"  # the image's /app/serve.yaml
    cfg = serve_config(
        ["--config", str(cfg_file), "--base", base, "--lora", lora, *container.get("args", [])]
    )
    assert spec["containerConcurrency"] == cfg.max_batch_size, "concurrency != batch size"
    port = container["ports"][0]["containerPort"]
    assert port == cfg.port == int(env_of_image["PORT"])
    health = urlparse(_health_url(cfg)).path
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": health, "port": port}
    startup = container["startupProbe"]
    budget = (
        startup.get("initialDelaySeconds", 0)
        + startup["periodSeconds"] * startup["failureThreshold"]
    )
    assert budget <= 240, "Cloud Run gives a startup probe 240 s at most"
    # secrets from Secret Manager, never as values; nothing Cloud Run reserves
    assert "valueFrom" in env[cfg.api_key_env] and "valueFrom" in env["WANDB_API_KEY"]
    for name in env:
        assert name not in CLOUD_RUN_RESERVED and code_reads(name), name
    # the model volume is where CVGEN_BASE points, read-only, from a bucket
    mount = container["volumeMounts"][0]
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert mount["mountPath"] == base and volume["csi"]["driver"] == "gcsfuse.run.googleapis.com"
    assert volume["csi"]["volumeAttributes"]["mountOptions"] == "only-dir=models/sd15"
    assert lora == PLACEHOLDERS["__LORA__"]  # the alias `cvgen promote` moves


def test_gpu_service_asks_for_an_l4() -> None:
    service = render_service(DOCKER / "cloudrun-gpu.yaml")
    template = service["spec"]["template"]
    assert template["spec"]["nodeSelector"] == {"run.googleapis.com/accelerator": "nvidia-l4"}
    limits = template["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert int(limits["cpu"]) >= 4 and int(limits["memory"].removesuffix("Gi")) >= 16
    assert template["metadata"]["annotations"]["run.googleapis.com/cpu-throttling"] == "false"
    assert (
        serve_config(
            [
                "--config",
                str(ROOT / "configs" / "serve.yaml"),
                *template["spec"]["containers"][0]["args"],
            ]
        ).device
        == "cuda"
    )


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_cloud_run_service_is_a_service_for_gcloud(path: Path, tmp_path: Path) -> None:
    rendered = tmp_path / path.name
    rendered.write_text(yaml.safe_dump(render_service(path)))
    out = gcloud_schema("run", rendered)
    assert out.returncode == 0, out.stderr


# ---- Cloud Build -----------------------------------------------------------------------------


def cloudbuild() -> dict[str, Any]:
    return yaml.safe_load(CLOUDBUILD.read_text())


def test_cloudbuild_substitutions_are_defined_and_used() -> None:
    build = cloudbuild()
    defined = set(build["substitutions"])
    used = substitutions_used({k: v for k, v in build.items() if k != "substitutions"})
    assert all(name.startswith("_") for name in defined)
    assert used - defined - CLOUD_BUILD_BUILTINS == set(), "undefined (or an unescaped $shell var)"
    assert defined - used == set(), "defined but unused: Cloud Build refuses those"
    for value in strings(build["images"]):
        assert "SHORT_SHA" not in value and "COMMIT_SHA" not in value  # empty when manual


def test_cloudbuild_file_parses_as_gcloud_loads_it() -> None:
    out = gcloud_schema("cloudbuild", CLOUDBUILD)
    assert out.returncode == 0, out.stderr


def run_step(
    step_id: str, values: dict[str, str], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Run a build step's bash script as Cloud Build would, with stub docker and gcloud."""
    step = next(s for s in cloudbuild()["steps"] if s["id"] == step_id)
    assert step["entrypoint"] == "bash" and step["args"][0] == "-c"
    script = substitute(step["args"][1], values).replace("/workspace/", f"{tmp_path}/")
    env, log = stub_bin(tmp_path, "docker", "gcloud")
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    return out, calls(log)


def build_values(short_sha: str, **overrides: str) -> dict[str, str]:
    values = {name: "" for name in CLOUD_BUILD_BUILTINS}
    values.update(PROJECT_ID="my-project", BUILD_ID="b-1234", SHORT_SHA=short_sha)
    values.update({k: str(v) for k, v in cloudbuild()["substitutions"].items()})
    values.update(overrides)
    return values


@pytest.mark.parametrize(
    ("sha", "tags"),
    [("", ["b-1234"]), ("abc1234", ["b-1234", "abc1234"])],
    ids=["manual", "trigger"],
)
def test_images_are_tagged_with_what_exists(sha: str, tags: list[str], tmp_path: Path) -> None:
    for step, name in (("build-serve", "serve"), ("build-train", "train")):
        out, ((_cmd, *args),) = run_step(step, build_values(sha), tmp_path / step)
        assert out.returncode == 0, out.stderr
        image = f"europe-west4-docker.pkg.dev/my-project/cvgen/{name}"
        assert [args[i + 1] for i, a in enumerate(args) if a == "-t"] == [
            f"{image}:{t}" for t in tags
        ]
        dockerfile = ROOT / args[args.index("-f") + 1]
        declared = {i.value[0].split("=")[0] for i in instructions(dockerfile) if i.cmd == "ARG"}
        build_args = dict(
            a.removeprefix("--build-arg=").split("=", 1)
            for a in args
            if a.startswith("--build-arg=")
        )
        build_args |= dict(
            args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--build-arg"
        )
        assert set(build_args) <= declared, (
            f"{dockerfile.name} has no ARG for {set(build_args) - declared}"
        )
        for src in copy_sources(dockerfile, build_args):
            assert (ROOT / src).exists(), src


def test_deploy_step_fills_in_the_service(tmp_path: Path) -> None:
    lora = PLACEHOLDERS["__LORA__"]
    for service in ("docker/cloudrun.yaml", "docker/cloudrun-gpu.yaml"):
        out, ((_, *args),) = run_step(
            "deploy", build_values("", _LORA=lora, _SERVICE_YAML=service), tmp_path
        )
        assert out.returncode == 0, out.stderr
        assert args[:3] == ["run", "services", "replace"] and args[-2:] == [
            "--region",
            "europe-west4",
        ]
        text = Path(args[3]).read_text()
        assert not [v for v in strings(yaml.safe_load(text)) if PLACEHOLDER.search(v)]
        assert lora in text
        assert "europe-west4-docker.pkg.dev/my-project/cvgen/serve:b-1234" in text
        assert "bucketName: my-project-cvgen" in text  # the default bucket
        if shutil.which("gcloud"):
            assert gcloud_schema("run", Path(args[3])).returncode == 0
            assert unknown_flags(args, ("gcloud", "run", "services", "replace")) == []
        (tmp_path / "calls.log").unlink()


def test_deploy_step_with_lora_none_serves_the_base_model(tmp_path: Path) -> None:
    out, ((_, *args),) = run_step("deploy", build_values("", _LORA="none"), tmp_path)
    assert out.returncode == 0, out.stderr
    (container,) = yaml.safe_load(Path(args[3]).read_text())["spec"]["template"]["spec"][
        "containers"
    ]
    assert {"name": "CVGEN_LORA", "value": ""} in container[
        "env"
    ]  # the image then passes no --lora
    entry = next(i for i in instructions(DOCKER / "serve.Dockerfile") if i.cmd == "ENTRYPOINT")
    assert "${CVGEN_LORA:+" in " ".join(entry.value)
    if shutil.which("gcloud"):
        assert gcloud_schema("run", Path(args[3])).returncode == 0


def test_deploy_step_without_a_lora_says_what_to_set(tmp_path: Path) -> None:
    out, called = run_step("deploy", build_values(""), tmp_path)
    assert out.returncode == 1 and "set _LORA" in out.stderr and called == []


def test_upload_holds_what_the_images_copy_and_not_the_rest(tmp_path: Path) -> None:
    """`gcloud builds submit` uploads what .gcloudignore lets through: the code, the model and
    LoRA folders a build may bake in; not the venv, git, DVC cache, data or checkpoints."""
    need("gcloud")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    work = tmp_path / "repo"
    for rel in [*tracked, ".gcloudignore"]:
        if (ROOT / rel).exists() or (ROOT / rel).is_symlink():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, work / rel, follow_symlinks=False)
    extra_in = ["models/tiny/model_index.json", "runs/demo/lora/pytorch_lora_weights.safetensors"]
    extra_out = [
        ".venv/bin/python",
        ".git/HEAD",
        "data/raw/a.jpg",
        ".dvc/cache/files/md5/ab/cd",
        ".dvc/config.local",
        "runs/demo/checkpoints/last.ckpt",
        "runs/demo/wandb/run.wandb",
        "cvgen/__pycache__/x.pyc",
    ]
    for rel in extra_in + extra_out:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text("x")
    out = subprocess.run(
        ["gcloud", "meta", "list-files-for-upload"],
        cwd=work,
        env=gcloud_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    uploaded = set(out.stdout.split())
    assert set(extra_in) <= uploaded
    assert not set(extra_out) & uploaded
    for path in DOCKERFILES:
        for src in copy_sources(path, {"MODEL_DIR": "models/tiny", "LORA_DIR": "runs/demo/lora"}):
            files = [t for t in tracked + extra_in if t == src or t.startswith(src + "/")]
            if src == "configs/serve.yaml":
                files = [src]  # through the configs -> cvgen/configs link
            assert files and set(files) <= uploaded, f"{path.name}: COPY {src} is not uploaded"
