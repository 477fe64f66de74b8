"""A few-step LoRA (LCM-LoRA, TCD-LoRA: ``speed_lora``) stacked on the portrait LoRA: fused with
a fused LoRA, an adapter beside switched ones, at its own scale; the config's checks; the
server's /info. On the tiny model, with a random kohya-format file standing in for the LCM-LoRA
(the format the published LCM-LoRA files use)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cvgen.errors import CVGenError
from cvgen.lora import KOHYA_WEIGHT_NAME
from cvgen.pipeline import SPEED_ADAPTER, load_pipelines
from cvgen.serve.config import ServeConfig, SettingError
from cvgen.serve.server import build_server
from cvgen.serve.wandb_lora import resolve_sources

from .conftest import img2img_array, make_random_lora, served

PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))


@pytest.fixture(scope="module")
def speed_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kohya-format LoRA file (``lora_unet_...`` keys, alpha 8 at rank 4), as LCM-LoRA ships."""
    folder = tmp_path_factory.mktemp("lcm")
    make_random_lora(tiny_model, folder, seed=7, alpha=8, kohya=True)
    return folder / KOHYA_WEIGHT_NAME


def sample(pipes: Any, lora: str | None, scale: float = 1.0) -> np.ndarray:
    pipes.select(lora, scale)
    return img2img_array(pipes.img2img, guidance_scale=1.0)  # a few-step LoRA's guidance


def load(tiny_model: Path, loras: dict[str, Path], **kw: Any) -> Any:
    return load_pipelines(
        tiny_model,
        {k: str(v) for k, v in loras.items()},
        device="cpu",
        dtype="float32",
        scheduler="lcm",
        **kw,
    )


def test_fused_speed_lora_equals_both_adapters_active(
    tiny_model: Path, two_loras: dict[str, Path], speed_lora: Path
):
    grey = {"grey": two_loras["grey"]}
    fused = load(tiny_model, grey, speed_lora=speed_lora, speed_lora_scale=0.8, lora_scale=0.5)
    apart = load(tiny_model, grey, speed_lora=speed_lora, speed_lora_scale=0.8, fuse=False)
    alone = load(tiny_model, grey, lora_scale=0.5)
    assert fused.fused and not apart.fused
    assert type(fused.img2img.scheduler).__name__ == "LCMScheduler"
    a, b, c = sample(fused, "grey", 0.5), sample(apart, "grey", 0.5), sample(alone, "grey")
    np.testing.assert_allclose(a, b, atol=2e-3)  # fused == the two adapters at their scales
    assert np.abs(a - c).mean() > 0.01  # the speed LoRA changes the image


def test_speed_lora_scale_zero_is_the_lora_alone(
    tiny_model: Path, two_loras: dict[str, Path], speed_lora: Path
):
    grey = {"grey": two_loras["grey"]}
    zero = load(tiny_model, grey, speed_lora=speed_lora, speed_lora_scale=0.0)
    alone = load(tiny_model, grey)
    np.testing.assert_allclose(sample(zero, "grey"), sample(alone, "grey"), atol=2e-3)


def test_switched_loras_keep_the_speed_lora_on(
    tiny_model: Path, two_loras: dict[str, Path], speed_lora: Path
):
    both = load(tiny_model, two_loras, speed_lora=speed_lora)
    assert not both.fused and both.always == {SPEED_ADAPTER: 1.0}
    warm_then_grey = [sample(both, "warm"), sample(both, "grey"), sample(both, "warm")]
    for name, got in (("warm", warm_then_grey[0]), ("grey", warm_then_grey[1])):
        one = load(tiny_model, {name: two_loras[name]}, speed_lora=speed_lora)
        np.testing.assert_allclose(got, sample(one, name), atol=2e-3)
    np.testing.assert_array_equal(warm_then_grey[0], warm_then_grey[2])


def test_speed_lora_on_the_base_alone_is_fused(tiny_model: Path, speed_lora: Path):
    base = load(tiny_model, {})
    fast = load(tiny_model, {}, speed_lora=speed_lora)
    assert fast.fused
    assert np.abs(sample(fast, None) - sample(base, None)).mean() > 0.01


def test_config_needs_a_few_step_scheduler(tiny_model: Path, speed_lora: Path):
    with pytest.raises(SettingError, match=r"^scheduler must be lcm or tcd with a speed_lora"):
        ServeConfig(base=str(tiny_model), speed_lora=str(speed_lora))
    with pytest.raises(SettingError, match=r"^speed_lora must be a local LoRA file or folder"):
        ServeConfig(base=str(tiny_model), scheduler="lcm", speed_lora="wandb://a/b/c:latest")
    with pytest.raises(SettingError, match="is the speed_lora's own"):
        ServeConfig(
            scheduler="tcd", speed_lora=str(speed_lora), loras={SPEED_ADAPTER: str(speed_lora)}
        )


def test_missing_or_misfit_speed_lora_is_one_line(
    tiny_model: Path, speed_lora: Path, tmp_path: Path
):
    cfg = ServeConfig(base=str(tiny_model), scheduler="lcm", speed_lora=str(tmp_path / "no"))
    with pytest.raises(CVGenError, match=r"^speed_lora: .*no such LoRA file or folder$"):
        resolve_sources(cfg)
    from safetensors.torch import load_file, save_file

    odd = {  # the down factors of another model's widths
        k: v[:, :2].contiguous() if "lora_down" in k and v.ndim == 2 else v
        for k, v in load_file(speed_lora).items()
    }
    save_file(odd, tmp_path / "odd.safetensors")
    cfg = cfg.model_copy(update={"speed_lora": str(tmp_path / "odd.safetensors")})
    with pytest.raises(CVGenError, match=r"^speed_lora: LoRA .* does not fit the base model"):
        resolve_sources(cfg)


def test_server_reports_and_uses_the_speed_lora(
    tiny_model: Path, random_lora: Path, speed_lora: Path
):
    cfg = ServeConfig(
        base=str(tiny_model),
        lora=str(random_lora),
        scheduler="lcm",
        speed_lora=str(speed_lora),
        speed_lora_scale=0.9,
        device="cpu",
        default_steps=8,
        default_guidance_scale=1.0,
        default_keep_face=False,
    )
    buf = io.BytesIO()
    PHOTO.save(buf, "PNG")
    with served(build_server(cfg, api_key=None)) as c:
        info = c.get("/info").json()
        assert info["speed_lora"] == {"path": str(speed_lora), "scale": 0.9}
        assert info["scheduler"] == "lcm"
        r = c.post(
            "/predict",
            files={"image": ("photo.png", buf.getvalue(), "image/png")},
            data={"prompt": "a professional portrait", "seed": "0"},
        )
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).size == (64, 64)
