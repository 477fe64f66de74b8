"""End-to-end training through the real CLI: fit, export, samples, W&B, checkpoints, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cvgen.cli import main
from cvgen.lora import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def fit_args(model: Path, data: Path, root: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        DEMO,
        "--model.base",
        str(model),
        "--data.root",
        str(data),
        "--trainer.max_steps",
        str(steps),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


@pytest.fixture(scope="module")
def demo_run(tiny_model: Path, sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real demo fit (W&B offline, validation with samples at step 3 and 6)."""
    root = tmp_path_factory.mktemp("run")
    args = fit_args(tiny_model, sample_data, root, 6, "--trainer.val_check_interval", "3")
    assert main(args) == 0
    return root


def test_fit_writes_lora_samples_checkpoints_and_offline_wandb(demo_run: Path, capsys) -> None:
    lora_dir = demo_run / "lora"
    assert (lora_dir / DIFFUSERS_WEIGHT_NAME).stat().st_size > 0
    assert (lora_dir / KOHYA_WEIGHT_NAME).stat().st_size > 0
    info = json.loads((lora_dir / "cvgen_lora.json").read_text())
    assert info["global_step"] == 6 and info["unet_lora"]["rank"] == 4
    assert not list(lora_dir.glob(".lora-*")), "a temporary export folder was left behind"
    assert (demo_run / "samples" / "step_000003.png").is_file()
    assert (demo_run / "samples" / "step_000006.png").is_file()
    # W&B: an offline run inside the run folder, with the loss in its history
    runs = list((demo_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wandb_file = next(runs[0].glob("run-*.wandb"))
    logged = wandb_file.read_bytes()
    assert b"train/loss" in logged and b"samples" in logged
    assert b"cvgen-lora" in logged, "the LoRA artifact was not logged"
    assert (demo_run / "config.yaml").is_file()


def test_lora_artifact_carries_the_last_validation_loss(demo_run: Path) -> None:
    """The metadata `cvgen promote` compares: val/loss of the last validation (step 6)."""
    logged = next((demo_run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    start = logged.index(b'{"global_step":')
    meta, _ = json.JSONDecoder().raw_decode(logged[start:].decode("utf-8", "replace"))
    assert meta["global_step"] == 6 and meta["metrics_step"] == 6
    val_loss = meta["metrics"]["val/loss"]
    assert isinstance(val_loss, float) and 0 < val_loss < 10


def test_checkpoint_holds_only_what_trains(demo_run: Path) -> None:
    ckpt_path = demo_run / "checkpoints" / "last.ckpt"
    size = ckpt_path.stat().st_size
    assert size < 2_000_000, f"checkpoint is {size} bytes: the frozen base leaked in"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert ckpt["global_step"] == 6
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["cvgen"]["unet_lora"]["rank"] == 4


def test_exported_lora_changes_a_fresh_diffusers_pipeline(demo_run: Path, tiny_model: Path) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    image = Image.new("RGB", (64, 64), (128, 110, 100))

    def run(pipe) -> torch.Tensor:
        out = pipe(
            "a professional headshot",
            image=image,
            strength=0.8,
            num_inference_steps=5,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
        return out.images

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = run(pipe)
    pipe.load_lora_weights(str(demo_run / "lora"), weight_name=DIFFUSERS_WEIGHT_NAME)
    adapted = run(pipe)
    assert (adapted - base).abs().max() > 1e-4, "the LoRA did not change the output"
    torch.testing.assert_close(run(pipe), adapted)  # deterministic for a seed


def test_resume_matches_an_uninterrupted_run(
    tiny_model: Path, sample_data: Path, tmp_path: Path
) -> None:
    quiet = ("--trainer.logger", "false", "--trainer.limit_val_batches", "0")
    # with the EMA of the LoRA weights on: the average resumes too
    every = ("--checkpoint.every_n_train_steps", "1", "--ema.decay", "0.9")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(fit_args(tiny_model, sample_data, straight, 8, *quiet, *every)) == 0
    # 3 training batches per epoch: stopping at step 4 is mid-epoch
    assert main(fit_args(tiny_model, sample_data, split, 4, *quiet, *every)) == 0
    resumed = fit_args(tiny_model, sample_data, split, 8, *quiet, *every, "--ckpt_path", "last")
    assert main(resumed) == 0

    a = load_file(straight / "lora" / DIFFUSERS_WEIGHT_NAME)
    b = load_file(split / "lora" / DIFFUSERS_WEIGHT_NAME)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    ca = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    cb = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)
    assert ca["global_step"] == cb["global_step"] == 8
    assert ca["lr_schedulers"][0]["_last_lr"] == cb["lr_schedulers"][0]["_last_lr"]
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    for i in sa:
        torch.testing.assert_close(sb[i]["exp_avg"], sa[i]["exp_avg"], rtol=1e-5, atol=1e-7)
    for k, v in ca["state_dict"].items():  # the trained weights, beside their average
        torch.testing.assert_close(cb["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    ea, eb = ca["cvgen_ema"], cb["cvgen_ema"]
    assert ea["updates"] == eb["updates"] == 8
    for k in ea["weights"]:
        torch.testing.assert_close(eb["weights"][k], ea["weights"][k], rtol=1e-5, atol=1e-6)


def test_validate_test_and_predict_subcommands(
    demo_run: Path, tiny_model: Path, sample_data: Path
) -> None:
    ckpt = str(demo_run / "checkpoints" / "last.ckpt")
    for cmd in ("validate", "test", "predict"):
        args = fit_args(tiny_model, sample_data, demo_run / cmd, 1, "--trainer.logger", "false")
        args[0] = cmd
        assert main([*args, "--ckpt_path", ckpt]) == 0, cmd
    written = sorted((demo_run / "predict" / "predictions").glob("heldout_*.png"))
    assert len(written) == 2  # the two held-out photos, generated through the LoRA


def test_bad_dataset_is_a_cli_error_naming_file_and_line(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "bad"
    data.mkdir()
    (data / "metadata.jsonl").write_text(
        '{"file_name": "a.jpg", "text": "ok"}\n{"file_name": "b.jpg", "text": ""}\n'
    )
    (data / "a.jpg").write_bytes(b"")
    args = fit_args(tiny_model, data, tmp_path / "run", 1, "--trainer.logger", "false")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "metadata.jsonl:2" in err and "caption" in err


def test_gpu_config_runs_on_cpu_with_overrides(
    tiny_model: Path, sample_data: Path, tmp_path: Path
) -> None:
    """configs/lora.yaml end to end (workers, bucketing, cosine schedule, min-SNR, offset
    noise, baseline samples), with only the device, model, size and length overridden."""
    lora_yaml = str(Path(DEMO).with_name("lora.yaml"))
    args = [
        "fit",
        "--config",
        lora_yaml,
        "--model.base",
        str(tiny_model),
        "--data.root",
        str(sample_data),
        "--data.resolution",
        "64",
        "--data.bucket_step",
        "16",
        "--data.batch_size",
        "2",
        "--data.num_workers",
        "1",
        "--data.val_fraction",
        "0.25",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        "--trainer.max_steps",
        "3",
        "--trainer.val_check_interval",
        "3",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.offline",
        "true",
        "--trainer.enable_progress_bar",
        "false",
        "--model.sampling.num_inference_steps",
        "4",
    ]
    assert main(args) == 0
    assert (tmp_path / "samples" / "step_000000.png").is_file()  # at_start baseline
    assert (tmp_path / "samples" / "step_000003.png").is_file()
    assert (tmp_path / "lora" / DIFFUSERS_WEIGHT_NAME).is_file()


@pytest.mark.parametrize("base", ["/nonexistent/sd", "./no-such-model"])
def test_missing_base_model_is_a_cli_error(
    base: str, sample_data: Path, tmp_path: Path, capsys
) -> None:
    args = fit_args(Path(base), sample_data, tmp_path, 1, "--trainer.logger", "false")
    args[args.index("--model.base") + 1] = base
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"base model {base!r}" in err and "not a diffusers Stable Diffusion folder" in err
    photo = tmp_path / "in.jpg"
    Image.new("RGB", (64, 64)).save(photo)
    out = str(tmp_path / "o.jpg")
    gen = ["generate", "--image", str(photo), "--prompt", "p", "--out", out, "--base", base]
    assert main(gen) == 2
    assert "not a diffusers Stable Diffusion folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "option"),
    [
        ("--optimizer", ("--optimizer", "torch.optim.SGD")),
        (
            "--optimizer",
            ("--optimizer.class_path=torch.optim.SGD", "--optimizer.init_args.lr", "1"),
        ),
        ("--lr_scheduler", ("--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1")),
    ],
    ids=["optimizer", "optimizer-init-args", "lr_scheduler"],
)
def test_lightning_optimizer_options_are_refused_naming_cvgen_keys(
    flag: str, option: tuple[str, ...], tiny_model: Path, sample_data: Path, tmp_path: Path, capsys
) -> None:
    """LightningCLI's --optimizer / --lr_scheduler would silently replace cvgen's optimizer,
    schedule, warm-up and text-encoder LR: refused, in one line naming the keys to use."""
    args = fit_args(tiny_model, sample_data, tmp_path / "run", 1, "--trainer.logger", "false")
    assert main([*args, *option]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1, errors
    assert f"{flag} is not supported" in errors[0]
    for key in ("model.optimizer", "model.learning_rate", "model.lr_scheduler"):
        assert key in errors[0], key
    assert not (tmp_path / "run" / "checkpoints").exists(), "it trained anyway"


def test_optimizer_in_a_config_file_is_refused(
    tiny_model: Path, sample_data: Path, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("optimizer:\n  class_path: SGD\n")
    args = fit_args(tiny_model, sample_data, tmp_path / "run", 1, "--trainer.logger", "false")
    assert main([*args, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}:1: optimizer is not supported" in err and "model.optimizer" in err
    assert not (tmp_path / "run" / "checkpoints").exists(), "it trained anyway"
