"""What a LoRA folder tells inference (``cvgen_lora.json``), and LoRAs made for another base."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cvgen import lora as lora_lib
from cvgen.cli import main
from cvgen.errors import CVGenError
from cvgen.pipeline import SCHEDULERS, load_img2img, make_scheduler

from .conftest import img2img_array

PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))


@pytest.fixture(scope="module")
def v_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA exported by the training callback from a module set to v_prediction (text
    encoder too, its rank apart from the UNet's)."""
    import pytorch_lightning as pl

    from cvgen.training.callbacks import LoRAExport
    from cvgen.training.module import LoRADiffusion

    torch.manual_seed(0)
    module = LoRADiffusion(
        base=str(tiny_model),
        prediction_type="v_prediction",
        rank=4,
        alpha=2.0,
        init_lora_weights=False,
        train_text_encoder=True,
        text_encoder_rank=8,
    )
    root = tmp_path_factory.mktemp("vrun")
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        default_root_dir=str(root),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    out = root / "lora"
    LoRAExport(dirpath=str(out), wandb_artifact=None).export(trainer, module)
    return out


def test_the_exported_info_names_the_prediction_type(v_lora: Path, tiny_model: Path) -> None:
    info = json.loads((v_lora / lora_lib.INFO_NAME).read_text())
    assert info["scheduler"] == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": False}
    # the keys it always had stay
    for key in ("base", "global_step", "epoch", "unet_lora", "text_encoder_lora", "data_version"):
        assert key in info, key
    assert info["base"] == str(tiny_model)
    assert lora_lib.read_lora_info(v_lora) == info
    assert lora_lib.read_lora_info(v_lora / lora_lib.KOHYA_WEIGHT_NAME) == info
    assert lora_lib.read_lora_info(v_lora.parent) == info  # the run folder


def test_load_img2img_samples_a_v_prediction_lora_as_one(
    v_lora: Path, tiny_model: Path, tmp_path: Path
) -> None:
    pipe = load_img2img(tiny_model, lora=v_lora, device="cpu", dtype="float32")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # the kohya file alone, as it comes from elsewhere: no json, so the base's settings
    shutil.copy(v_lora / lora_lib.KOHYA_WEIGHT_NAME, tmp_path / "portrait.safetensors")
    assert lora_lib.read_lora_info(tmp_path / "portrait.safetensors") == {}
    plain = load_img2img(
        tiny_model, lora=tmp_path / "portrait.safetensors", device="cpu", dtype="float32"
    )
    assert plain.scheduler.config.prediction_type == "epsilon"
    assert np.abs(img2img_array(pipe) - img2img_array(plain)).max() > 1e-3


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_takes_the_lora_settings(tiny_model: Path, name: str) -> None:
    from diffusers import PNDMScheduler

    base = PNDMScheduler.from_pretrained(tiny_model, subfolder="scheduler").config
    settings = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    scheduler = make_scheduler(name, base, **settings)
    assert scheduler.config.prediction_type == "v_prediction"
    # where the class has the zero-terminal-SNR switch it is set; elsewhere it is left out
    assert scheduler.config.get("rescale_betas_zero_snr", True) is True


def test_evaluate_script_samples_with_the_lora_settings(
    v_lora: Path, tiny_model: Path, sample_data: Path, tmp_path: Path
) -> None:
    spec = importlib.util.spec_from_file_location(
        "evaluate_script", Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
    )
    assert spec is not None and spec.loader is not None
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)

    def run_with(prediction_type: str) -> dict[str, Any]:
        run = tmp_path / prediction_type
        shutil.copytree(v_lora, run / "lora")
        info_path = run / "lora" / lora_lib.INFO_NAME
        info = json.loads(info_path.read_text())
        info["scheduler"]["prediction_type"] = prediction_type
        info_path.write_text(json.dumps(info))
        (run / "csv" / "version_0").mkdir(parents=True)
        (run / "csv" / "version_0" / "metrics.csv").write_text("step,train/loss\n1,0.5\n")
        argv = ["--run", str(run), "--data", str(sample_data), "--base", str(tiny_model)]
        argv += ["--out", str(run / "eval"), "--num-images", "1", "--steps", "4"]
        assert evaluate.main(argv) == 0
        return json.loads((run / "eval" / "metrics.json").read_text())["img2img"]

    assert run_with("v_prediction") != run_with("epsilon")


def test_read_lora_info_names_a_broken_file(tmp_path: Path, random_lora: Path) -> None:
    shutil.copy(random_lora, tmp_path / lora_lib.DIFFUSERS_WEIGHT_NAME)
    assert lora_lib.read_lora_info(tmp_path) == {}
    (tmp_path / lora_lib.INFO_NAME).write_text('{"scheduler": {"prediction_type": "noise"}}')
    with pytest.raises(CVGenError, match=r"cvgen_lora\.json: scheduler\.prediction_type"):
        lora_lib.read_lora_info(tmp_path)
    (tmp_path / lora_lib.INFO_NAME).write_text("{not json")
    with pytest.raises(CVGenError, match=r"cvgen_lora\.json: cannot read it"):
        lora_lib.read_lora_info(tmp_path)


# ---- a LoRA for another base ---------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a UNet of twice its widths (the same text encoder)."""
    from diffusers import UNet2DConditionModel

    from cvgen.modelzoo import UNET_CONFIGS

    out = tmp_path_factory.mktemp("models") / "wide"
    shutil.copytree(tiny_model, out)
    shutil.rmtree(out / "unet")
    torch.manual_seed(0)
    UNet2DConditionModel(
        **{**UNET_CONFIGS["tiny"], "block_out_channels": (64, 128)}
    ).save_pretrained(out / "unet")
    return out


@pytest.fixture(scope="module")
def wide_lora(wide_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(wide_model / "unet")
    unet.requires_grad_(False)
    lora_lib.add_lora(unet, lora_lib.LoRASpec(rank=4))
    out = tmp_path_factory.mktemp("wide-run") / "lora"
    lora_lib.save_lora(out, unet, info={"base": str(wide_model)})
    return out


def _generate(base: Path, lora: Path, out: Path) -> list[str]:
    return [
        "generate",
        "--image",
        str(out.parent / "photo.png"),
        "--prompt",
        "a portrait",
        "--out",
        str(out),
        "--base",
        str(base),
        "--lora",
        str(lora),
        "--device",
        "cpu",
        "--steps",
        "2",
    ]


def _one_line_error(capsys: pytest.CaptureFixture[str], progress: bool = False) -> str:
    """The one line on stderr (besides, with ``progress``, the base model's loading bar)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if progress:
        lines = [line for line in lines if not line.startswith("Loading pipeline components")]
    assert len(lines) == 1, err[:2000]
    assert lines[0].startswith("cvgen: error: LoRA ")
    return lines[0]


def test_generate_with_a_lora_for_another_base_is_one_line(
    tiny_model: Path, wide_model: Path, wide_lora: Path, tmp_path: Path, capsys
) -> None:
    PHOTO.save(tmp_path / "photo.png")
    out = tmp_path / "out.jpg"
    assert main(_generate(tiny_model, wide_lora, out)) == 2
    line = _one_line_error(capsys)
    assert f"LoRA {wide_lora} was trained on {wide_model}, not {tiny_model} (" in line
    assert (
        "(unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora.down.weight" in line
    )
    assert "has shape [4, 64], expected [4, 32])" in line, line
    assert not out.exists()
    # the kohya file alone (no cvgen_lora.json to name its base)
    shutil.copy(wide_lora / lora_lib.KOHYA_WEIGHT_NAME, tmp_path / "wide.safetensors")
    assert main(_generate(tiny_model, tmp_path / "wide.safetensors", out)) == 2
    line = _one_line_error(capsys)
    assert f"does not fit the base model {tiny_model} (lora_unet_" in line


def test_a_mismatch_found_only_at_load_time_is_one_line_too(
    tiny_model: Path, wide_model: Path, wide_lora: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Where the headers cannot be compared (a hub id), loading finds the mismatch."""
    monkeypatch.setattr(lora_lib, "check_lora_fits", lambda base, lora: None)
    PHOTO.save(tmp_path / "photo.png")
    assert main(_generate(tiny_model, wide_lora, tmp_path / "out.jpg")) == 2
    line = _one_line_error(capsys, progress=True)
    assert f"was trained on {wide_model}, not {tiny_model} (" in line
    assert "has shape [" in line and "expected [" in line


def test_check_lora_fits(
    tiny_model: Path, wide_model: Path, wide_lora: Path, random_lora: Path
) -> None:
    lora_lib.check_lora_fits(tiny_model, random_lora)  # made for it: fine
    lora_lib.check_lora_fits(wide_model, wide_lora)
    lora_lib.check_lora_fits(tiny_model, None)
    lora_lib.check_lora_fits("some-org/some-model", wide_lora)  # a hub id: left to loading
    with pytest.raises(CVGenError, match=rf"LoRA {random_lora} does not fit the base model"):
        lora_lib.check_lora_fits(wide_model, random_lora)


def test_serve_refuses_a_lora_for_another_base_before_starting(
    tiny_model: Path, wide_model: Path, wide_lora: Path, capsys, monkeypatch
) -> None:
    import cvgen.serve.cli as serve_cli

    def no_server(cfg: Any) -> int:
        raise AssertionError("the server was started")

    monkeypatch.setattr(serve_cli, "supervise", no_server)
    assert main(["serve", "--base", str(tiny_model), "--lora", str(wide_lora)]) == 2
    line = _one_line_error(capsys)
    assert f"was trained on {wide_model}, not {tiny_model}" in line
