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
    # complete: every section, with the values of the file (nested blocks key by key: an
    # override file names only the keys it changes)
    for section in ("trainer", "model", "data", "checkpoint", "ema", "export", "samples"):
        assert section in printed, section
    original = yaml.safe_load(config.read_text())
    original.pop("base_config", None)  # resolved, not printed
    assert "base_config" not in printed
    assert_holds(printed, original)
    assert printed["trainer"]["logger"]["init_args"]["project"] == "cvgen"


def assert_holds(printed: dict, original: dict, where: str = "") -> None:
    """Every value of ``original`` is in ``printed``, nested dicts key by key."""
    for key, value in original.items():
        assert key in printed, where + key
        if isinstance(value, dict) and "class_path" not in value:
            assert_holds(printed[key], value, f"{where}{key}.")
        elif isinstance(value, dict):  # a class: its init_args may be partial
            assert printed[key]["class_path"] == value["class_path"], where + key
            assert_holds(printed[key]["init_args"], value.get("init_args", {}), f"{where}{key}.")
        else:
            assert printed[key] == value, where + key


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


def print_config(config: Path, capsys, *extra: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config), *extra, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_demo_is_lora_yaml_plus_its_overrides(capsys) -> None:
    """demo.yaml names only what differs; the rest resolves from lora.yaml, and a later
    --config or flag still overrides both."""
    demo = next(c for c in CONFIGS if c.name == "demo.yaml")
    base = yaml.safe_load(demo.read_text())["base_config"]
    lora = yaml.safe_load((demo.parent / base).read_text())
    printed = print_config(demo, capsys, "--data.batch_size", "3")
    assert printed["data"]["batch_size"] == 3
    assert printed["trainer"]["accelerator"] == "cpu"  # demo
    assert printed["trainer"]["gradient_clip_val"] == lora["trainer"]["gradient_clip_val"]
    assert printed["model"]["snr_gamma"] == lora["model"]["snr_gamma"]
    assert printed["model"]["levers"]["channels_last"] is False  # demo, inside a lora block
    assert printed["model"]["levers"]["retain_cpu_memory"] is True  # lora, beside it
    logger = printed["trainer"]["logger"]["init_args"]
    assert logger["name"] == "demo" and logger["log_model"] is False
    assert printed["ema"]["decay"] is None and lora["ema"]["decay"] == 0.999


def test_configs_copied_together_still_resolve(tmp_path: Path, capsys, monkeypatch) -> None:
    """`cvgen init` copies the configs into a project folder: the base is found next to the
    override, wherever the command runs from."""
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    for config in CONFIGS:
        (folder / config.name).write_text(config.read_text())
    monkeypatch.chdir(tmp_path)
    assert print_config(folder / "demo.yaml", capsys)["trainer"]["max_steps"] == 30


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("base_config: lora.yml", "base_config 'lora.yml': no such file"),
        ("base_config: mine.yaml", "base_config 'mine.yaml' leads back to itself"),
        ("base_config: [lora.yaml]", "base_config must be a file name"),
    ],
)
def test_a_bad_base_config_is_a_one_line_error_naming_file_and_line(
    line: str, message: str, tmp_path: Path, capsys
) -> None:
    from cvgen.cli import main

    config = tmp_path / "mine.yaml"
    config.write_text(f"# my settings\n{line}  # the base\ntrainer:\n  max_steps: 3  # short\n")
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"cvgen: error: {config}:2: {message}"), err
