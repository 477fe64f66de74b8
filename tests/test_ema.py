"""EMA of the LoRA weights: the arithmetic, the swap, what checkpoints and exports hold (the
:class:`~cvgen.training.ema.EMA` callback beside the model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from cvgen.data.datamodule import PortraitDataModule
from cvgen.lora import DIFFUSERS_WEIGHT_NAME, save_lora
from cvgen.training.callbacks import LoRAExport
from cvgen.training.ema import EMA, LoRAEMA
from cvgen.training.module import LoRADiffusion


def quiet_trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer writing nothing but what its callbacks write (into ``root``)."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
    }
    return pl.Trainer(**{**defaults, **kwargs})


def test_average_warms_up_then_follows_the_decay() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    ema = LoRAEMA(0.5)
    ema.start({"w": p})
    values = [4.0, 8.0, 2.0]
    expected = torch.zeros(3)
    for n, v in enumerate(values):
        with torch.no_grad():
            p.fill_(v)
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * v
        ema.update({"w": p})
    assert ema.updates == 3
    torch.testing.assert_close(ema.shadow["w"], expected)
    # 0.1, 0.18..., then capped at 0.5: the start weights fade fast in a short run
    assert ema.current_decay() == pytest.approx(min(0.5, 4 / 13))
    with pytest.raises(ValueError, match=r"ema\.decay"):
        LoRAEMA(1.0)


def test_applied_swaps_in_and_back_and_nests() -> None:
    p = torch.nn.Parameter(torch.full((2,), 5.0))
    ema = LoRAEMA(0.9)
    ema.shadow = {"w": torch.full((2,), 1.0)}
    with ema.applied({"w": p}):
        assert p.tolist() == [1.0, 1.0]
        assert ema.trained_weights() is not None
        with ema.applied({"w": p}):  # nested (an export during validation): no change
            assert p.tolist() == [1.0, 1.0]
        assert p.tolist() == [1.0, 1.0]
    assert p.tolist() == [5.0, 5.0] and ema.trained_weights() is None


def test_checkpoint_saved_while_averaged_holds_the_trained_weights(
    tiny_model: Path, tmp_path: Path
) -> None:
    module = LoRADiffusion(base=str(tiny_model), init_lora_weights=False)
    module.setup("fit")
    ema = EMA(decay=0.9)
    trainer = quiet_trainer(tmp_path, callbacks=[ema])
    ema.on_fit_start(trainer, module)
    with torch.no_grad():
        for p in module.lora_parameters().values():
            p.add_(1.0)  # the trained weights move away from the average
    trained = {n: p.detach().clone() for n, p in module.lora_parameters().items()}
    with ema.averaged(trainer, module):
        ckpt = {"state_dict": module.state_dict()}
        ema.on_save_checkpoint(trainer, module, ckpt)
        module.on_save_checkpoint(ckpt)
    for n, t in trained.items():
        torch.testing.assert_close(ckpt["state_dict"][n], t)
        assert not torch.equal(ckpt["cvgen_ema"]["weights"][n], t)


def test_fit_exports_the_average_and_checkpoints_both(
    tiny_model: Path, sample_data: Path, tmp_path: Path
) -> None:
    module = LoRADiffusion(base=str(tiny_model), learning_rate=1e-2)
    ema = EMA(decay=0.8)
    dm = PortraitDataModule(root=str(sample_data), resolution=64, batch_size=2, num_workers=0)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=4,
        limit_val_batches=1,
        val_check_interval=2,
        callbacks=[ema, LoRAExport(dirpath=str(tmp_path / "lora"), wandb_artifact=None)],
    )
    trainer.fit(module, datamodule=dm)
    assert ema.average is not None and ema.average.updates == 4
    exported = load_file(tmp_path / "lora" / DIFFUSERS_WEIGHT_NAME)
    save_lora(tmp_path / "raw", module.unet, None, kohya=False)  # the trained weights
    raw = load_file(tmp_path / "raw" / DIFFUSERS_WEIGHT_NAME)
    with ema.averaged(trainer, module):
        save_lora(tmp_path / "avg", module.unet, None, kohya=False)
    avg = load_file(tmp_path / "avg" / DIFFUSERS_WEIGHT_NAME)
    assert exported.keys() == avg.keys()
    for k in exported:
        torch.testing.assert_close(exported[k], avg[k], msg=k)
    assert any(not torch.allclose(exported[k], raw[k]) for k in exported)
    # the training weights are back after validation and export
    for n, p in module.lora_parameters().items():
        assert not torch.equal(p.detach(), ema.average.shadow[n]), n

    trainer.save_checkpoint(tmp_path / "final.ckpt")
    ckpt = torch.load(tmp_path / "final.ckpt", weights_only=False)
    params = module.lora_parameters()
    for n, t in ckpt["state_dict"].items():
        torch.testing.assert_close(t, params[n].detach(), msg=n)
        torch.testing.assert_close(ckpt["cvgen_ema"]["weights"][n], ema.average.shadow[n])
    assert ckpt["cvgen_ema"]["updates"] == 4
