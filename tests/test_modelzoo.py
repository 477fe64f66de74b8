"""The random SD models: loadable by diffusers, deterministic for a seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cvgen.cli import main
from cvgen.modelzoo import UNET_CONFIGS


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix == ".safetensors"
    }


def test_tiny_model_is_a_diffusers_folder(tiny_model: Path) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model / sub).is_dir(), sub
    assert (tiny_model / "model_index.json").is_file()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model)
    ids = pipe.tokenizer("a professional headshot of a woman").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.model_max_length == 77


def test_cli_model_random_is_deterministic(tmp_path: Path, tiny_model: Path, capsys) -> None:
    assert main(["model", "random", "--arch", "tiny", "--out", str(tmp_path / "a")]) == 0
    assert "wrote a random tiny" in capsys.readouterr().out
    assert digest(tmp_path / "a") == digest(tiny_model)
    assert main(["model", "random", "--out", str(tmp_path / "b"), "--seed", "1"]) == 0
    assert digest(tmp_path / "b") != digest(tiny_model)


def test_cli_data_sample(tmp_path: Path, capsys) -> None:
    assert main(["data", "sample", "--out", str(tmp_path / "s"), "--size", "64"]) == 0
    lines = (tmp_path / "s" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 8
    assert main(["data", "check", str(tmp_path / "s")]) == 0


def test_cli_help_and_unknown_command(capsys) -> None:
    assert main(["--help"]) == 0
    assert "fit" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


@pytest.mark.slow
def test_sd15_architecture_has_sd15_size(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"])
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n - 859_520_964) < 1_000_000, n
