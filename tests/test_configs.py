"""Every shipped config parses, every key is commented, and the demo one instantiates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cvgen.training.cli import CVGenCLI, run_cli
from cvgen.training.module import LoRADiffusion

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TRAIN_CONFIGS = [c for c in CONFIGS if "trainer" in yaml.safe_load(c.read_text())]
KEY_LINE = re.compile(r"^\s*(- )?[A-Za-z_][\w.]*:(\s|$)")


def test_there_are_configs() -> None:
    names = {c.name for c in CONFIGS}
    assert {"demo.yaml", "lora.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_key_has_a_comment(config: Path) -> None:
    missing = [
        f"{config.name}:{i}: {line.strip()}"
        for i, line in enumerate(config.read_text().splitlines(), start=1)
        if KEY_LINE.match(line) and "#" not in line
    ]
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


@pytest.mark.parametrize("config", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_training_config_parses_and_prints(config: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    # complete: every section, with the values of the file
    for section in ("trainer", "model", "data", "checkpoint", "ema", "export", "samples"):
        assert section in printed, section
    original = yaml.safe_load(config.read_text())
    for key, value in original["model"].items():
        assert printed["model"][key] == value, key
    assert printed["trainer"]["logger"]["init_args"]["project"] == "cvgen"


def test_demo_config_instantiates_with_overrides(
    tiny_model: Path, sample_data: Path, tmp_path: Path
) -> None:
    demo = next(c for c in CONFIGS if c.name == "demo.yaml")
    cli = CVGenCLI(
        LoRADiffusion,
        __import__("cvgen.data.datamodule", fromlist=["PortraitDataModule"]).PortraitDataModule,
        run=False,
        seed_everything_default=0,
        args=[
            "--config",
            str(demo),
            "--model.base",
            str(tiny_model),
            "--data.root",
            str(sample_data),
            "--data.resolution",
            "32",
            "--data.batch_size",
            "1",
            "--trainer.max_steps",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
        ],
    )
    assert isinstance(cli.model, LoRADiffusion)
    assert cli.model.hparams.base == str(tiny_model)
    assert cli.datamodule.resolution == 32 and cli.datamodule.batch_size == 1
    assert cli.trainer.max_steps == 3
    assert Path(cli.trainer.default_root_dir) == tmp_path
    # linked: outputs follow default_root_dir
    assert Path(cli.trainer.checkpoint_callback.dirpath) == tmp_path / "checkpoints"
    trainable = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
