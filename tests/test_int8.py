"""``quantize: int8-static`` (cvgen.int8) on the tiny model: the UNet's convolutions and Linear
layers become int8 in a calibrated, compiled graph that the pipelines call through the UNet's
forward; the output stays within the faithful PSNR of fp32; what it cannot serve is refused
with a message that names the setting."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cvgen.accel import ServeLevers
from cvgen.errors import CVGenError
from cvgen.images import psnr
from cvgen.int8 import Int8UNet
from cvgen.serve.config import load_config
from tests.conftest import img2img_array

FAITHFUL_DB = 30.0  # the bar for a faithful lever (measured here: about 40 dB)
INT8 = {"compile_unet": True, "quantize": "int8-static", "calibration_steps": 2}


@pytest.fixture(autouse=True)
def _process_settings() -> Iterator[None]:
    """What int8-static sets for the whole process, put back for the other tests."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    before = inductor.freezing, dynamo.recompile_limit
    yield
    inductor.freezing, dynamo.recompile_limit = before


def int8_pipeline(tiny_pipeline: Any, **levers: Any) -> Any:
    pipe = copy.deepcopy(tiny_pipeline)
    before = torch.get_num_threads()
    line = ServeLevers(**{**INT8, **levers}).apply_pipeline(pipe, cpu=True)
    torch.set_num_threads(before)
    assert "quantize=int8-static(unet, 2 calibration steps, compiled)" in line
    return pipe


def converted_graph(int8: Int8UNet, size: tuple[int, int]) -> torch.fx.GraphModule:
    graph: torch.fx.GraphModule = int8.graphs[size]._orig_mod  # under torch.compile
    return graph


def test_the_unet_runs_int8_and_stays_close_to_fp32(
    tiny_pipeline: Any, fp32_reference: np.ndarray
) -> None:
    pipe = int8_pipeline(tiny_pipeline)
    int8 = pipe.unet.forward
    assert isinstance(int8, Int8UNet)
    out = img2img_array(pipe)
    assert int8.calibrated == [(32, 32)]  # the 64 px photo's latents (the tiny VAE halves)
    assert torch._dynamo.config.recompile_limit >= 63  # every batch size keeps its int8 graph
    graph = converted_graph(int8, (32, 32))
    targets = {str(n.target) for n in graph.graph.nodes}
    assert any("quantize_per_tensor" in t for t in targets)  # int8 activations
    convs = [n for n in graph.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    weights = [getattr(graph, n.args[1].args[0].target) for n in convs]  # dequantize(int8 w)
    assert convs and all(w.dtype == torch.int8 for w in weights)  # the convolutions too
    assert not np.array_equal(out, fp32_reference)  # it is the int8 graph that ran
    assert psnr(out, fp32_reference) >= FAITHFUL_DB
    assert pipe.unet.dtype == torch.float32 and tiny_pipeline.unet.forward != int8


@pytest.mark.slow
def test_new_sizes_and_batches_calibrate_once_each(
    tiny_pipeline: Any, fp32_reference: np.ndarray
) -> None:
    from PIL import Image

    pipe = int8_pipeline(tiny_pipeline)
    img2img_array(pipe)
    photo = Image.new("RGB", (48, 64), (120, 100, 90))
    kwargs = {"strength": 0.5, "num_inference_steps": 4, "output_type": "np"}
    pipe(prompt=["a", "b"], image=[photo, photo], guidance_scale=5.0, **kwargs)  # batch 4

    def single(p: Any) -> Any:  # guidance 1: one latent per image, batch 1
        seed = torch.Generator().manual_seed(0)
        return p(prompt="a", image=photo, guidance_scale=1.0, generator=seed, **kwargs).images[0]

    out, ref = single(pipe), single(copy.deepcopy(tiny_pipeline))
    assert pipe.unet.forward.calibrated == [(32, 32), (32, 24)]
    assert psnr(out, ref) >= FAITHFUL_DB
    assert psnr(img2img_array(pipe), fp32_reference) >= FAITHFUL_DB  # the first size as it was


def test_calibration_samples_the_img2img_window(tiny_pipeline: Any) -> None:
    int8 = Int8UNet(tiny_pipeline.unet, tiny_pipeline, calibration_steps=3)
    calls = int8.calibration_inputs(8, 12)
    assert len(calls) == 3
    for x, t, e in calls:
        assert x.shape == (2, 4, 8, 12) and x.dtype == torch.float32
        assert t.shape == () and e.shape[0] == 2
        assert torch.equal(x[0], x[1])  # the guided pair: one latent, two prompts
        assert not torch.equal(e[0], e[1])
    steps = [float(t) for _, t, _ in calls]
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == 3


def test_switchable_adapters_are_refused(tiny_model: Path, random_lora: Path) -> None:
    from cvgen.pipeline import load_pipelines

    pipes = load_pipelines(
        tiny_model, {"a": random_lora}, fuse=False, device="cpu", dtype="float32"
    )
    with pytest.raises(CVGenError, match="needs the LoRA fused into the UNet"):
        Int8UNet(pipes.img2img.unet, pipes.img2img)


def test_inputs_beyond_the_plain_call_are_refused(tiny_pipeline: Any) -> None:
    int8 = Int8UNet(tiny_pipeline.unet, tiny_pipeline)
    x, e = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 32)
    with pytest.raises(CVGenError, match="also passes timestep_cond"):
        int8(x, 10, e, timestep_cond=torch.zeros(2, 4))
    with pytest.raises(CVGenError, match="one timestep per call"):
        int8(x, torch.tensor([10, 20]), e)
    assert not int8.graphs  # refused before anything was exported


def test_it_is_refused_on_a_gpu_and_an_arm_cpu(
    tiny_pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CVGenError, match="int8-static is for x86 CPUs"):
        ServeLevers(**INT8).apply_pipeline(copy.deepcopy(tiny_pipeline), cpu=False)
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    before = torch.get_num_threads()
    with pytest.raises(CVGenError, match="this one is aarch64; use int8-dynamic"):
        ServeLevers(**INT8).apply_pipeline(copy.deepcopy(tiny_pipeline), cpu=True)
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"levers": {"quantize": "int8-static"}}, "levers.quantize int8-static needs compile_unet"),
        (
            {"levers": {**INT8, "quantize_parts": ["unet", "vae"]}},
            "quantizes the UNet only: quantize_parts must be [unet]",
        ),
        ({"levers": {**INT8, "token_merging": 0.3}}, "does not combine with token_merging"),
        ({"levers": {**INT8, "calibration_steps": 0}}, "levers.calibration_steps must be >= 1"),
        (
            {"levers": INT8, "loras": {"a": "a.safetensors", "b": "b.safetensors"}},
            "fuse_lora must be true, with one LoRA under loras, for levers.quantize int8-static",
        ),
        (
            {"levers": INT8, "lora": "a.safetensors", "fuse_lora": False},
            "fuse_lora must be true",
        ),
    ],
)
def test_settings_it_cannot_serve_are_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(CVGenError) as e:
        load_config(overrides=overrides)
    assert message in str(e.value)


@pytest.mark.slow
def test_the_engine_serves_a_fused_lora_in_int8(tiny_model: Path, random_lora: Path) -> None:
    """As ``cvgen serve`` and ``cvgen generate`` load it: a LoRA fused, bf16 where the CPU has
    it, warm-up at batch 1 and 2; the image is the fp32 engine's within the faithful PSNR."""
    from PIL import Image

    from cvgen.faces import Box
    from cvgen.serve.config import ServeConfig
    from cvgen.serve.engine import Img2ImgEngine
    from cvgen.serve.schema import GenParams, GenRequest

    common = {"base": str(tiny_model), "lora": str(random_lora), "device": "cpu"}
    int8 = Img2ImgEngine.load(
        ServeConfig(**common, levers=ServeLevers(**INT8), max_batch_size=2, dtype="auto")
    )
    assert isinstance(int8.pipe.unet.forward, Int8UNet) and int8.pipes.fused
    assert int8.pipes.inpaint.unet is int8.pipe.unet  # keep_face's pipeline runs it too
    warmed = len(int8.pipe.unet.forward.calibrated)
    params = GenParams.parse({"prompt": "portrait", "seed": 3, "steps": 4}, int8.cfg)
    w, h = int8.cfg.framed_size(params.framing)
    photo = Image.new("RGB", (w, h), (100, 50, 25))
    face = Box(w // 3, h // 4, w // 3, w // 3)  # keep_face (the default): the inpainting path
    image = int8.generate([GenRequest(photo, params, face=face)])[0].image
    reference = Img2ImgEngine.load(ServeConfig(**common, dtype="float32", warmup=False))
    expected = reference.generate([GenRequest(photo, params, face=face)])[0].image
    assert psnr(np.asarray(image), np.asarray(expected)) >= FAITHFUL_DB
    assert len(int8.pipe.unet.forward.calibrated) == warmed  # the warm-up's size: no new one
