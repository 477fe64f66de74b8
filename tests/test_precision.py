"""Mixed precision: frozen weights in the compute dtype, LoRA weights in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvgen.cli import main
from cvgen.lora import DIFFUSERS_WEIGHT_NAME
from cvgen.training.module import LoRADiffusion

from .test_train import fit_args


def _dtypes(module: LoRADiffusion) -> tuple[set[torch.dtype], set[torch.dtype]]:
    lora = {p.dtype for n, p in module.unet.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in module.unet.named_parameters() if "lora_" not in n}
    return lora, base


def test_bf16_mixed_keeps_lora_in_fp32(tiny_model: Path, sample_data: Path, tmp_path: Path) -> None:
    args = fit_args(
        tiny_model,
        sample_data,
        tmp_path,
        2,
        "--trainer.precision",
        "bf16-mixed",
        "--trainer.logger",
        "false",
        "--trainer.limit_val_batches",
        "0",
    )
    assert main(args) == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert {v.dtype for v in ckpt["state_dict"].values()} == {torch.float32}
    exported = load_file(tmp_path / "lora" / DIFFUSERS_WEIGHT_NAME)
    assert {v.dtype for v in exported.values()} == {torch.float32}


def test_setup_casts_frozen_weights_only(tiny_model: Path) -> None:
    class FakeTrainer:
        precision = "bf16-mixed"

    module = LoRADiffusion(base=str(tiny_model))
    module._trainer = FakeTrainer()  # type: ignore[assignment]
    module.setup("fit")
    lora, base = _dtypes(module)
    assert lora == {torch.float32} and base == {torch.bfloat16}
    assert module.text_encoder.dtype == torch.bfloat16
    assert module.vae.dtype == torch.bfloat16
    FakeTrainer.precision = "16-mixed"
    module.setup("fit")
    assert module.vae.dtype == torch.float32  # vae_fp32: no NaN latents under fp16
    FakeTrainer.precision = "bf16-true"
    with pytest.raises(ValueError, match="bf16-mixed"):
        module.setup("fit")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_cuda_fit_in_mixed_precision(
    tiny_model: Path, sample_data: Path, tmp_path: Path, precision: str
) -> None:
    args = fit_args(
        tiny_model,
        sample_data,
        tmp_path,
        4,
        "--trainer.accelerator",
        "gpu",
        "--trainer.precision",
        precision,
        "--trainer.logger",
        "false",
        "--trainer.val_check_interval",
        "2",
    )
    assert main(args) == 0
    assert (tmp_path / "lora" / DIFFUSERS_WEIGHT_NAME).is_file()
    assert (tmp_path / "samples" / "step_000004.png").is_file()
