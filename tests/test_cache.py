"""The latent cache: hit on reuse, new key when model / resolution / data change, the same
loss and the same augmentation decisions as the pixel path, and real fits that use it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvgen.cli import main
from cvgen.data import cache as cache_lib
from cvgen.data.datamodule import PortraitDataModule
from cvgen.data.dataset import collate
from cvgen.data.encoders import model_fingerprint
from cvgen.lora import DIFFUSERS_WEIGHT_NAME
from cvgen.training.module import LoRADiffusion

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def fit_args(model: Path, data: Path, root: Path, steps: int, *extra: str) -> list[str]:
    """``cvgen fit`` on the demo config (as in test_train.py)."""
    return [
        *("fit", "--config", DEMO, "--model.base", str(model), "--data.root", str(data)),
        *("--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root)),
        *("--trainer.enable_progress_bar", "false", *extra),
    ]


@pytest.fixture(scope="module")
def module(tiny_model: Path) -> LoRADiffusion:
    m = LoRADiffusion(base=str(tiny_model), init_lora_weights=False)
    m.setup("fit")
    return m


def train_set(root: Path, resolution: int = 64, **kw):
    dm = PortraitDataModule(root=str(root), resolution=resolution, num_workers=0, **kw)
    dm.setup("fit")
    assert dm.train_set is not None
    return dm.train_set


def build(module, ds, cache_dir: Path, resolution: int = 64) -> cache_lib.LatentCache:
    plan = cache_lib.plan_cache(ds, train_text_encoder=False)
    return cache_lib.build_or_load(module.encoders, ds, cache_dir, resolution, plan)


def test_second_build_is_a_hit_and_changes_make_new_keys(
    module, sample_data: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    first = build(module, train_set(sample_data), cache_dir)
    again = build(module, train_set(sample_data), cache_dir)
    assert not first.hit and again.hit and again.key == first.key
    for a, b in zip(first.mean, again.mean, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert json.loads((first.path / "manifest.json").read_text())["key"] == first.key

    # resolution
    lower = build(module, train_set(sample_data, resolution=32), cache_dir, resolution=32)
    assert not lower.hit and lower.key != first.key
    assert lower.mean[0].shape[-1] == first.mean[0].shape[-1] // 2
    # transforms: flipping stores the mirrored latents too
    flipped = build(module, train_set(sample_data, random_flip=True), cache_dir)
    assert not flipped.hit and flipped.key != first.key and flipped.mean_flip is not None

    # data: a re-saved image (new bytes and mtime), then an edited caption
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    copied = build(module, train_set(data), cache_dir)
    assert copied.key != first.key  # other paths: another data set
    assert build(module, train_set(data), cache_dir).hit
    img = sorted((data / "images").iterdir())[0]
    img.write_bytes(img.read_bytes() + b"\0")
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    touched = build(module, train_set(data), cache_dir)
    assert not touched.hit and touched.key != copied.key
    meta = data / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("studio background", "grey background"))
    recaptioned = build(module, train_set(data), cache_dir)
    assert not recaptioned.hit and recaptioned.key not in (copied.key, touched.key)


def test_model_fingerprint_follows_contents_not_paths(tiny_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)  # copy2: same bytes, same mtimes
    fp = model_fingerprint(str(tiny_model))
    assert model_fingerprint(str(copy)) == fp
    # the UNet is not part of the frozen encoders: changing it keeps the cache
    (copy / "unet" / "config.json").write_text((copy / "unet" / "config.json").read_text() + " ")
    assert model_fingerprint(str(copy)) == fp
    cfg = copy / "vae" / "config.json"
    vae = json.loads(cfg.read_text())
    vae["scaling_factor"] = 0.5
    cfg.write_text(json.dumps(vae))
    changed = model_fingerprint(str(copy))
    assert changed != fp
    weights = next((copy / "text_encoder").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert model_fingerprint(str(copy)) != changed
    assert model_fingerprint("org/model") != model_fingerprint("org/other")


def test_cached_batches_give_the_pixel_loss_and_augmentation(
    module, sample_data: Path, tmp_path: Path
) -> None:
    ds = train_set(sample_data, random_flip=True, caption_dropout=0.4)
    cached = cache_lib.CachedLatentDataset(ds, build(module, ds, tmp_path / "c"))
    keys = [(i, epoch) for epoch in range(6) for i in range(len(ds))]
    flips = set()
    for key in keys:
        pixel_item, cached_item = ds[key], cached[key]
        assert cached_item["text"] == pixel_item["text"], key
        flip, _ = ds.augmentation(*key)
        flips.add(flip)
        assert (
            cached_item["latent_mean"]
            is (cached.cache.mean_flip if flip else cached.cache.mean)[key[0]]
        )
    assert flips == {True, False}
    assert any(cached[k]["text"] == "" for k in keys), "caption dropout never fired"
    for start in range(0, len(keys), 4):
        chunk = keys[start : start + 4]
        pixels = collate([ds[k] for k in chunk])
        latents = cache_lib.collate_cached([cached[k] for k in chunk])
        assert "encoder_hidden_states" in latents
        with torch.no_grad():
            a = module.diffusion_step(pixels, module._generator(start))
            b = module.diffusion_step(latents, module._generator(start))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_plan_leaves_text_out_when_it_cannot_be_cached(
    module, sample_data: Path, tmp_path: Path
) -> None:
    plain = cache_lib.plan_cache(train_set(sample_data), train_text_encoder=False)
    assert plain.latents and plain.text and not plain.reasons
    shuffled = train_set(sample_data, shuffle_captions=True)
    plan = cache_lib.plan_cache(shuffled, train_text_encoder=False)
    assert plan.latents and not plan.text and "shuffle_captions" in plan.reasons[0]
    te = cache_lib.plan_cache(train_set(sample_data), train_text_encoder=True)
    assert te.latents and not te.text and "text encoder" in te.reasons[0]
    cache = cache_lib.build_or_load(module.encoders, shuffled, tmp_path / "c", 64, plan)
    item = cache_lib.CachedLatentDataset(shuffled, cache)[(0, 3)]
    assert "encoder_hidden_states" not in item and item["text"] == shuffled[(0, 3)]["text"]


def test_a_cache_without_manifest_is_rebuilt(module, sample_data: Path, tmp_path: Path) -> None:
    first = build(module, train_set(sample_data), tmp_path)
    (first.path / "manifest.json").unlink()  # as if interrupted before the manifest
    assert not build(module, train_set(sample_data), tmp_path).hit


def test_fit_from_cache_matches_fit_from_pixels(
    tiny_model: Path, sample_data: Path, tmp_path: Path
) -> None:
    """Same seeds: the LoRA trained from cached latents equals the one trained from pixels
    (flip and caption dropout on, both served from the cache); a rerun hits the cache."""
    quiet = ("--trainer.logger", "false", "--trainer.limit_val_batches", "0")
    aug = ("--data.random_flip", "true", "--data.caption_dropout", "0.3")
    cached, pixels = tmp_path / "cached", tmp_path / "pixels"
    assert main(fit_args(tiny_model, sample_data, cached, 4, *quiet, *aug)) == 0
    manifests = list((cached / "latent_cache").glob("*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["flip"] is True
    off = ("--data.cache_latents", "false")
    assert main(fit_args(tiny_model, sample_data, pixels, 4, *quiet, *aug, *off)) == 0
    assert not (pixels / "latent_cache").exists()
    a = load_file(pixels / "lora" / DIFFUSERS_WEIGHT_NAME)
    b = load_file(cached / "lora" / DIFFUSERS_WEIGHT_NAME)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    # resuming in the same run folder reads the cache instead of encoding again
    stamp = (manifests[0].stat().st_ino, manifests[0].stat().st_mtime_ns)
    rerun = fit_args(tiny_model, sample_data, cached, 5, *quiet, *aug, "--ckpt_path", "last")
    assert main(rerun) == 0
    assert list((cached / "latent_cache").glob("*/manifest.json")) == manifests
    assert (manifests[0].stat().st_ino, manifests[0].stat().st_mtime_ns) == stamp


def test_encoders_fingerprint_follows_their_dtype(module) -> None:
    enc = module.encoders
    before = enc.fingerprint
    enc.vae.to(torch.bfloat16)
    try:
        assert enc.fingerprint != before  # latents encoded in another dtype: another cache
    finally:
        enc.vae.to(torch.float32)
    assert enc.fingerprint == before


def test_datamodule_serves_latents_only_with_encoders_attached(
    module, sample_data: Path, tmp_path: Path
) -> None:
    """The data side gets the encoders handed over (no model, no trainer needed); without
    them it serves pixels and says why."""
    kw = {"root": str(sample_data), "resolution": 64, "batch_size": 2, "num_workers": 0}
    plain = PortraitDataModule(**kw, cache_dir=str(tmp_path))
    plain.setup("fit")
    assert "pixel_values" in next(iter(plain.train_dataloader()))
    assert plain.cache_status == "off: no encoders attached"

    dm = PortraitDataModule(**kw, cache_dir=str(tmp_path))
    dm.attach_encoders(module.encoders)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert {"latent_mean", "latent_std", "encoder_hidden_states"} <= set(batch)
    assert dm.cache_status.startswith("on") and list(tmp_path.glob("*/manifest.json"))


def test_fit_hands_the_models_encoders_to_the_datamodule(
    tiny_model: Path, sample_data: Path, tmp_path: Path
) -> None:
    """A plain ``Trainer.fit(model, datamodule=dm)`` trains from the cache too: the model's
    setup attaches its encoders."""
    from .test_ema import quiet_trainer

    model = LoRADiffusion(base=str(tiny_model))
    dm = PortraitDataModule(root=str(sample_data), resolution=64, batch_size=2, num_workers=0)
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule=dm)
    assert dm.encoders is model.encoders
    assert dm.cache_status.startswith("on") and dm.latent_cache is not None
    assert list((tmp_path / "latent_cache").glob("*/manifest.json"))
