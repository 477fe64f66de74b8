"""LoRA invariants, as properties over rank, alpha and target modules."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from cvgen import lora as lora_lib

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
PROPS = settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

ranks = st.integers(min_value=1, max_value=8)
alphas = st.one_of(st.none(), st.sampled_from([0.5, 1.0, 3.0, 8.0, 32.0]))
targets = st.lists(st.sampled_from(TARGETS), min_size=1, max_size=4, unique=True)


@pytest.fixture(scope="module")
def base_unet(tiny_model: Path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    unet.requires_grad_(False)
    return unet


def _inputs(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(2, 4, size // 2, size // 2, generator=g)
    t = torch.tensor([10, 500])
    cond = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    return x, t, cond


def _adapted(base_unet, rank, alpha, target, init="gaussian"):
    unet = copy.deepcopy(base_unet)
    spec = lora_lib.LoRASpec(rank=rank, alpha=alpha, target_modules=target, init=init)
    params = lora_lib.add_lora(unet, spec)
    return unet, params


@PROPS
@given(rank=ranks, alpha=alphas, target=targets)
def test_only_lora_parameters_train(base_unet, rank, alpha, target):
    unet, params = _adapted(base_unet, rank, alpha, target)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable, "LoRA added no trainable parameters"
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # every targeted projection got exactly one A and one B of the requested rank
    adapted = {n.rsplit(".lora_", 1)[0] for n in trainable}
    assert all(any(n.endswith("." + t) for t in target) for n in adapted)
    for n, p in unet.named_parameters():
        if ".lora_A." in n:
            assert p.shape[0] == rank
    assert len(params) == len(trainable) == 2 * len(adapted)


@PROPS
@given(rank=ranks, alpha=alphas, target=targets)
def test_base_weights_never_change(base_unet, rank, alpha, target):
    unet, params = _adapted(base_unet, rank, alpha, target)
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    lora_before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, t, cond = _inputs(unet)
    for _ in range(2):
        loss = unet(x, t, cond).sample.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in unet.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f"base weight {n} changed"
    assert any(not torch.equal(a, b) for a, b in zip(params, lora_before, strict=True))


@PROPS
@given(rank=ranks, target=targets)
def test_zero_initialised_lora_is_the_identity(base_unet, rank, target):
    unet, _ = _adapted(base_unet, rank, None, target, init=True)
    x, t, cond = _inputs(unet)
    with torch.no_grad():
        assert torch.equal(unet(x, t, cond).sample, base_unet(x, t, cond).sample)


_COMPONENTS: dict = {}


def _fresh_pipeline(tiny_model: Path):
    """A pipeline with its own copy of the tiny model (loaded from disk once)."""
    from diffusers import StableDiffusionPipeline

    key = str(tiny_model)
    if key not in _COMPONENTS:
        _COMPONENTS[key] = StableDiffusionPipeline.from_pretrained(
            tiny_model, safety_checker=None
        ).components
    return StableDiffusionPipeline(**copy.deepcopy(_COMPONENTS[key]))


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(rank=ranks, alpha=alphas, target=targets)
def test_save_then_load_is_the_identity(
    tiny_model, base_unet, tmp_path_factory, monkeypatch, rank, alpha, target
):
    unet, _ = _adapted(base_unet, rank, alpha, target, init=False)  # random A and B
    out = tmp_path_factory.mktemp("lora")
    path = lora_lib.save_lora(out, unet)
    assert path.name == lora_lib.DIFFUSERS_WEIGHT_NAME
    x, t, cond = _inputs(unet, seed=1)
    with torch.no_grad():
        expected = unet(x, t, cond).sample
    for weight in (lora_lib.DIFFUSERS_WEIGHT_NAME, lora_lib.KOHYA_WEIGHT_NAME):
        pipe = _fresh_pipeline(tiny_model)
        pipe.load_lora_weights(str(out), weight_name=weight)
        with torch.no_grad():
            got = pipe.unet(x, t, cond).sample
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=weight)
    # and the plain folder load that the docs promise picks the diffusers file (diffusers
    # < 0.40 refuses to guess a weight name in offline mode, even for a local folder)
    import diffusers.loaders.lora_base as lora_base

    monkeypatch.setattr(lora_base, "HF_HUB_OFFLINE", False)
    pipe = _fresh_pipeline(tiny_model)
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, cond).sample, expected, atol=1e-5, rtol=1e-4)


def test_kohya_file_has_a1111_keys_and_true_alpha(base_unet, tmp_path):
    unet, _ = _adapted(base_unet, 4, 2.0, TARGETS, init=False)
    lora_lib.save_lora(tmp_path, unet)
    with safe_open(str(tmp_path / lora_lib.KOHYA_WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys)
    assert any(k.endswith(".lora_up.weight") for k in keys)
    assert alphas and set(alphas.values()) == {2.0}
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0


def test_text_encoder_lora_round_trip(tiny_model: Path, tmp_path: Path):
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    te.requires_grad_(False)
    lora_lib.add_lora(
        te, lora_lib.LoRASpec(rank=2, target_modules=lora_lib.TEXT_ENCODER_TARGETS, init=False)
    )
    pipe = _fresh_pipeline(tiny_model)
    unet = copy.deepcopy(pipe.unet)
    lora_lib.add_lora(unet, lora_lib.LoRASpec(rank=2, init=False))
    lora_lib.save_lora(tmp_path, unet, te)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = te(ids)[0]
    with safe_open(str(tmp_path / lora_lib.KOHYA_WEIGHT_NAME), "pt") as f:
        assert any(k.startswith("lora_te_text_model_") for k in f.keys())  # noqa: SIM118 (safe_open is no dict)
    pipe.load_lora_weights(str(tmp_path), weight_name=lora_lib.DIFFUSERS_WEIGHT_NAME)
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], expected, atol=1e-5, rtol=1e-4)


def test_bad_targets_are_a_clear_error(base_unet):
    with pytest.raises(ValueError, match="no_such_module"):
        _adapted(base_unet, 2, None, ["no_such_module"])
