"""Multi-process DDP on CPU (gloo), text-encoder LoRA and EMA included: no unused-parameter
errors, no hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from cvgen.lora import DIFFUSERS_WEIGHT_NAME

from .test_train import fit_args


def test_ddp_two_processes_with_text_encoder_lora(
    tiny_model: Path, sample_data: Path, tmp_path: Path
) -> None:
    args = fit_args(
        tiny_model,
        sample_data,
        tmp_path,
        3,
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.logger",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--model.train_text_encoder",
        "true",
        "--ema.decay",
        "0.9",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "cvgen.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 3 steps" in proc.stdout + proc.stderr
    lora = load_file(tmp_path / "lora" / DIFFUSERS_WEIGHT_NAME)
    te_keys = [k for k in lora if k.startswith("text_encoder.")]
    assert te_keys, "the text-encoder LoRA was not exported"
    # trained: some lora_B (zero at init) moved away from zero in both the UNet and the TE
    for prefix in ("unet.", "text_encoder."):
        ups = [v for k, v in lora.items() if k.startswith(prefix) and ".up.weight" in k]
        assert ups and any(torch.count_nonzero(v) > 0 for v in ups), prefix
    # the EMA of the LoRA weights (the export is the average, taken on rank 0 only)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["cvgen_ema"]["updates"] == 3
    assert set(ckpt["cvgen_ema"]["weights"]) == set(ckpt["state_dict"])
