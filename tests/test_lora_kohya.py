"""The kohya-format LoRA file, loaded the way its users load it.

diffusers' ``load_lora_weights`` runs its own kohya converter on it; kohya sd-scripts
(``networks/lora.py``, ``create_network_from_weights``) and ComfyUI (``comfy/lora.py``) look
modules up by name, ``lora_unet_<diffusers module path with _ for .>`` and
``lora_te_<text-encoder module path>``, and scale each by ``alpha / rank`` from its ``.alpha``
tensor. A module whose keys do not follow that form is dropped silently (sd-scripts) or
applied at scale 1 (ComfyUI), so the tests check the names, the alphas, and what diffusers
makes of the file against the diffusers-format file and against the adapted models.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cvgen import lora as lora_lib

from .conftest import img2img_array

_COMPONENTS: dict[str, dict[str, Any]] = {}


def _components(tiny_model: Path) -> dict[str, Any]:
    from diffusers import StableDiffusionImg2ImgPipeline

    key = str(tiny_model)
    if key not in _COMPONENTS:
        _COMPONENTS[key] = StableDiffusionImg2ImgPipeline.from_pretrained(
            tiny_model, safety_checker=None, requires_safety_checker=False
        ).components
    return _COMPONENTS[key]


def _pipeline(tiny_model: Path) -> Any:
    """An img2img pipeline with its own copy of the tiny model."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**copy.deepcopy(_components(tiny_model)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _complaints() -> Iterator[list[str]]:
    """What diffusers logs (WARNING and up) and what peft/diffusers warn about, meanwhile."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        found.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)


def _lora_state(model: Any, adapter: str) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter)


def _scalings(model: Any, adapter: str) -> dict[str, float]:
    return {
        name: float(m.scaling[adapter])
        for name, m in model.named_modules()
        if isinstance(getattr(m, "scaling", None), dict) and adapter in m.scaling
    }


def _sd_scripts_names(unet: Any, text_encoder: Any) -> set[str]:
    """The LoRA module names kohya sd-scripts builds for an SD 1.x model: every Linear or
    Conv2d inside a ``Transformer2DModel`` (UNet) or a CLIP attention/MLP block (text
    encoder), named ``<prefix>.<parent>.<child>`` with ``_`` for ``.``."""
    names = set()
    roots = (
        ("lora_unet", unet, ("Transformer2DModel",)),
        ("lora_te", text_encoder, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")),
    )
    for prefix, root, parents in roots:
        for name, module in root.named_modules():
            if type(module).__name__ in parents:
                for child_name, child in module.named_modules():
                    if type(child).__name__ in ("Linear", "Conv2d"):
                        names.add(f"{prefix}.{name}.{child_name}".replace(".", "_"))
    return names


CASES = {
    # name: (UNet rank, UNet alpha, text-encoder (rank, alpha) or None)
    "unet": (4, 2.0, None),
    "unet+text_encoder": (4, 8.0, (8, 2.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kohya_file_loads_in_diffusers_as_the_diffusers_file_does(
    tiny_model: Path, tmp_path: Path, case: str
) -> None:
    rank, alpha, te_lora = CASES[case]
    parts = _components(tiny_model)
    torch.manual_seed(0)
    unet = copy.deepcopy(parts["unet"])
    lora_lib.add_lora(unet, lora_lib.LoRASpec(rank=rank, alpha=alpha, init=False))
    te = None
    if te_lora is not None:
        te = copy.deepcopy(parts["text_encoder"])
        spec = lora_lib.LoRASpec(
            rank=te_lora[0],
            alpha=te_lora[1],
            target_modules=lora_lib.TEXT_ENCODER_TARGETS,
            init=False,
        )
        lora_lib.add_lora(te, spec)
    lora_lib.save_lora(tmp_path, unet, te)

    # the file: per module exactly lora_down, lora_up and alpha, under the names kohya
    # sd-scripts and ComfyUI build, with each part's own alpha (scale = alpha / rank)
    kohya = load_file(str(tmp_path / lora_lib.KOHYA_WEIGHT_NAME))
    modules: dict[str, set[str]] = {}
    for key in kohya:
        name, _, field = key.partition(".")
        modules.setdefault(name, set()).add(field)
    assert modules and all(
        f == {"lora_down.weight", "lora_up.weight", "alpha"} for f in modules.values()
    ), sorted(kohya)[:4]
    assert set(modules) <= _sd_scripts_names(parts["unet"], parts["text_encoder"])
    n_unet = sum(n.startswith("lora_unet_") for n in modules)
    n_te = sum(n.startswith("lora_te_") for n in modules)
    assert n_unet > 0 and n_te == (0 if te is None else 8) and n_unet + n_te == len(modules)
    for name in modules:
        want = (rank, alpha) if name.startswith("lora_unet_") else te_lora
        assert want is not None
        assert kohya[f"{name}.lora_down.weight"].shape[0] == want[0], name
        assert kohya[f"{name}.alpha"].item() == want[1], name

    # diffusers: every key placed, nothing to complain about, the adapters equal the ones
    # the diffusers-format file gives (weights and alpha / rank scalings)
    from_diffusers, from_kohya = _pipeline(tiny_model), _pipeline(tiny_model)
    from_diffusers.load_lora_weights(
        str(tmp_path), weight_name=lora_lib.DIFFUSERS_WEIGHT_NAME, adapter_name="d"
    )
    with _complaints() as complaints:
        from_kohya.load_lora_weights(
            str(tmp_path), weight_name=lora_lib.KOHYA_WEIGHT_NAME, adapter_name="k"
        )
    if te is None:  # diffusers notes that the file has no text-encoder part: it has none
        complaints = [c for c in complaints if "No LoRA keys associated to CLIPTextModel" not in c]
    assert not complaints, complaints
    for part, count in (("unet", n_unet), ("text_encoder", n_te)):
        if count == 0:
            assert not lora_lib.has_lora(getattr(from_kohya, part))
            continue
        got = _lora_state(getattr(from_kohya, part), "k")
        want_state = _lora_state(getattr(from_diffusers, part), "d")
        assert sum(".lora_A." in k for k in got) == count, part
        assert got.keys() == want_state.keys(), part
        for key, value in want_state.items():
            torch.testing.assert_close(got[key], value, msg=f"{part} {key}")
        scalings = _scalings(getattr(from_kohya, part), "k")
        assert scalings == _scalings(getattr(from_diffusers, part), "d"), part
        trained_rank, trained_alpha = (rank, alpha) if part == "unet" else te_lora  # type: ignore[misc]
        assert set(scalings.values()) == {trained_alpha / trained_rank}, part

    # and what the models compute is what the trained models compute
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([[1, 5, 9, 2]])
    size = unet.config.sample_size
    x = torch.randn(1, 4, size, size, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        cond = (te or parts["text_encoder"])(ids)[0]
        torch.testing.assert_close(from_kohya.text_encoder(ids)[0], cond)
        expected = unet(x, t, cond).sample
        torch.testing.assert_close(from_kohya.unet(x, t, cond).sample, expected)

    image = img2img_array(from_kohya)
    np.testing.assert_allclose(image, img2img_array(from_diffusers), atol=1e-5)
    assert np.abs(image - img2img_array(_pipeline(tiny_model))).max() > 1e-3  # the LoRA shows
