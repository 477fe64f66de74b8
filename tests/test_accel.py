"""Serving levers (cvgen.accel): threads from the CPU quota, the bf16 fallback, int8
quantization, compile with frozen weights, token merging and DeepCache: each is applied, and
each keeps the output within its stated distance of fp32 on the tiny model."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cvgen import accel, perf
from cvgen.accel import ServeLevers
from cvgen.errors import CVGenError
from cvgen.images import psnr
from cvgen.serve.config import load_config
from tests.conftest import img2img_array

# PSNR of the tiny model's img2img output against fp32, same seed and photo (4 steps x 0.75),
# that a faithful lever keeps: the 30 dB (measured on the tiny model: int8-dynamic 61 dB,
# int8-weight 79 dB, bf16 50 dB); the approximate ones must move the image, by at most
# APPROXIMATE_DB (measured: token merging 0.5 58 dB, DeepCache interval 2 42 dB)
FAITHFUL_DB = 30.0
APPROXIMATE_DB = 25.0


def cgroup(tmp_path: Path, files: dict[str, str], own: str = "0::/\n") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "self-cgroup"
    proc.write_text(own)
    return root, proc


@pytest.mark.parametrize(
    ("files", "own", "affinity", "threads"),
    [
        ({"cpu.max": "200000 100000\n"}, "0::/\n", 8, 2),  # v2: 2 CPUs of 8
        ({"cpu.max": "150000 100000\n"}, "0::/\n", 8, 1),  # 1.5 CPUs: rounded down
        ({"cpu.max": "50000 100000\n"}, "0::/\n", 8, 1),  # half a CPU: at least one thread
        ({"cpu.max": "max 100000\n"}, "0::/\n", 6, 6),  # no quota: the affinity
        ({"cpu.max": "800000 100000\n"}, "0::/\n", 4, 4),  # quota above the affinity
        # v2, the process in a child cgroup: its own cpu.max wins over the root's
        (
            {"cpu.max": "max 100000\n", "svc/run/cpu.max": "300000 100000\n"},
            "0::/svc/run\n",
            16,
            3,
        ),
        # v1: CFS quota and period; -1 is no quota
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "", 16, 4),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "", 16, 16),
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "100000", "cpu,cpuacct/cpu.cfs_period_us": "50000"},
            "",
            3,
            2,
        ),
        ({}, "", 5, 5),  # no cgroup files at all
        ({"cpu.max": "garbage\n"}, "0::/\n", 3, 3),
    ],
)
def test_threads_from_the_cpu_quota(
    tmp_path: Path, files: dict[str, str], own: str, affinity: int, threads: int
) -> None:
    root, proc = cgroup(tmp_path, files, own)
    got = accel.cpu_quota_threads(root, affinity=set(range(affinity)), self_cgroup=proc)
    assert got == threads


def test_set_threads_uses_the_quota_and_an_explicit_count() -> None:
    before = torch.get_num_threads()
    try:
        assert accel.set_threads(1) == 1 and torch.get_num_threads() == 1
        n = accel.set_threads(0)
        assert n == accel.cpu_quota_threads() and torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("quota", "workers", "threads"), [(8, 1, 8), (8, 2, 4), (8, 3, 2), (2, 4, 1)]
)
def test_workers_on_one_cpu_share_the_quota(
    monkeypatch: pytest.MonkeyPatch, quota: int, workers: int, threads: int
) -> None:
    """``threads: 0`` with several CPU workers gives each its share, not each the whole quota
    (which would run workers x quota threads on quota CPUs)."""
    monkeypatch.setattr(accel, "cpu_quota_threads", lambda: quota)
    before = torch.get_num_threads()
    try:
        assert accel.set_threads(0, workers) == threads == torch.get_num_threads()
        assert accel.set_threads(3, workers) == 3  # an explicit count is taken as it is
    finally:
        torch.set_num_threads(before)


def test_bf16_on_a_cpu_without_it_falls_back_to_fp32_with_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cvgen.pipeline import resolve_dtype

    monkeypatch.setattr(accel, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(accel, "cpu_supports_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="cvgen.pipeline"):
        assert resolve_dtype("bf16", "cpu") == torch.float32
    lines = [r.getMessage() for r in caplog.records if r.name == "cvgen.pipeline"]
    assert len(lines) == 1 and "no native bf16" in lines[0] and "float32" in lines[0]
    assert resolve_dtype("float32", "cpu") == torch.float32  # nothing else changes
    assert resolve_dtype("auto", "cpu") == torch.float32  # auto: fp32 there, without a line
    assert len([r for r in caplog.records if r.name == "cvgen.pipeline"]) == 1
    monkeypatch.setattr(accel, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16  # and bf16 where the CPU has it


def levered(tiny_pipeline: Any, levers: ServeLevers) -> Any:
    """A copy of the tiny pipeline with ``levers`` applied (the session's stays as it is)."""
    pipe = copy.deepcopy(tiny_pipeline)
    before = torch.get_num_threads()
    levers.apply_pipeline(pipe, cpu=True)
    torch.set_num_threads(before)
    return pipe


@pytest.mark.parametrize("kind", ["int8-dynamic", "int8-weight"])
def test_quantize_makes_int8_weights_and_stays_close_to_fp32(
    tiny_pipeline: Any, fp32_reference: np.ndarray, kind: str
) -> None:
    pipe = levered(
        tiny_pipeline, ServeLevers(quantize=kind, quantize_parts=["unet", "text_encoder"])
    )
    to_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(to_q.weight).__module__.startswith("torchao")
    assert to_q.weight.qdata.dtype == torch.int8
    assert accel.is_quantized(pipe.unet) and accel.is_quantized(pipe.text_encoder)
    assert not accel.is_quantized(pipe.vae) and not accel.is_quantized(tiny_pipeline.unet)
    assert psnr(img2img_array(pipe), fp32_reference) >= FAITHFUL_DB


def test_quantize_leaves_lora_adapters_unquantized(tiny_model: Path, random_lora: Path) -> None:
    from cvgen.pipeline import load_pipelines

    pipes = load_pipelines(
        tiny_model, {"a": random_lora}, fuse=False, device="cpu", dtype="float32"
    )
    accel.quantize_module(pipes.img2img.unet, "int8-dynamic")
    lora_layer = pipes.img2img.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(lora_layer.base_layer.weight).__module__.startswith("torchao")
    assert type(lora_layer.lora_A["a"].weight) is torch.nn.Parameter


def test_bf16_stays_close_to_fp32(tiny_model: Path, fp32_reference: np.ndarray) -> None:
    from cvgen.pipeline import load_img2img

    pipe = load_img2img(tiny_model, device="cpu", dtype="bfloat16")
    assert pipe.unet.dtype == torch.bfloat16  # this CPU has bf16 (else fp32: see the fallback)
    assert psnr(img2img_array(pipe), fp32_reference) >= FAITHFUL_DB


def test_compile_on_cpu_freezes_the_weights(tiny_pipeline: Any) -> None:
    import torch._inductor.config as inductor

    before = inductor.freezing
    try:
        pipe = levered(tiny_pipeline, ServeLevers(compile_unet=True))
        assert perf.is_compiled(pipe.unet) and inductor.freezing is True
        inductor.freezing = False
        pipe = levered(tiny_pipeline, ServeLevers(compile_unet=True, freeze_weights=False))
        assert perf.is_compiled(pipe.unet) and inductor.freezing is False
    finally:
        inductor.freezing = before


@pytest.mark.slow
def test_compiled_frozen_int8_unet_stays_close_to_fp32(
    tiny_pipeline: Any, fp32_reference: np.ndarray
) -> None:
    import torch._inductor.config as inductor

    before = inductor.freezing
    try:
        levers = ServeLevers(compile_unet=True, quantize="int8-dynamic")
        out = img2img_array(levered(tiny_pipeline, levers))
    finally:
        inductor.freezing = before
    assert psnr(out, fp32_reference) >= FAITHFUL_DB


def test_token_merging_patches_the_unet_and_moves_the_output_boundedly(
    tiny_pipeline: Any, fp32_reference: np.ndarray
) -> None:
    pipe = levered(tiny_pipeline, ServeLevers(token_merging=0.5))
    blocks = [m for m in pipe.unet.modules() if hasattr(m, "_tome_info")]
    assert blocks and type(blocks[-1]).__name__ == "ToMeBlock"
    out = img2img_array(pipe)
    assert not np.array_equal(out, fp32_reference)  # approximate: it does move the image
    assert psnr(out, fp32_reference) >= APPROXIMATE_DB


def test_deepcache_skips_the_deep_blocks_and_resets_between_calls(
    tiny_pipeline: Any, fp32_reference: np.ndarray
) -> None:
    pipe = levered(tiny_pipeline, ServeLevers(deepcache_interval=2))
    calls: list[int] = []
    pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *_: calls.append(1))
    first = img2img_array(pipe)  # 4 steps x 0.75 = 3 UNet calls, the deep part on 2 of them
    assert len(calls) == 2
    assert psnr(first, fp32_reference) >= APPROXIMATE_DB
    assert not np.array_equal(first, fp32_reference)
    # a call of another batch size and step count must not reuse this call's features
    from PIL import Image

    photo = Image.new("RGB", (64, 64), (120, 100, 90))
    pipe(
        prompt=["a", "b"],
        image=[photo, photo],
        strength=0.9,
        num_inference_steps=7,
        generator=torch.Generator().manual_seed(0),
    )
    np.testing.assert_array_equal(img2img_array(pipe), first)  # and the next one is as fresh


def test_deepcache_does_not_combine_with_compile() -> None:
    with pytest.raises(ValueError, match="deepcache_interval does not combine with compile_unet"):
        ServeLevers(deepcache_interval=3, compile_unet=True)


@pytest.mark.parametrize(
    ("module", "levers", "key"),
    [
        ("torchao", {"quantize": "int8-dynamic"}, "quantize"),
        ("tomesd", {"token_merging": 0.3}, "token_merging"),
        ("DeepCache", {"deepcache_interval": 3}, "deepcache_interval"),
    ],
)
def test_a_lever_without_its_extra_names_the_extra(
    tiny_pipeline: Any,
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    levers: dict[str, Any],
    key: str,
) -> None:
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    pipe = copy.deepcopy(tiny_pipeline)
    with pytest.raises(CVGenError, match=rf"levers\.{key} needs {module}.*cvgen\[cpu-fast\]"):
        ServeLevers(**levers).apply_pipeline(pipe, cpu=False)


@pytest.mark.parametrize(
    ("levers", "message"),
    [
        ({"quantize": "int4"}, "levers.quantize must be one of none, int8-dynamic, int8-weight"),
        ({"quantize_parts": ["unet", "safety"]}, "levers.quantize_parts must name"),
        ({"token_merging": 0.9}, "levers.token_merging must be in [0, 0.75)"),
        ({"threads": -1}, "levers.threads must be >= 0"),
        ({"threds": 2}, "unknown key levers.threds (did you mean threads?)"),
    ],
)
def test_serving_levers_are_checked_in_the_config(levers: dict[str, Any], message: str) -> None:
    with pytest.raises(CVGenError) as e:
        load_config(overrides={"levers": levers})
    assert message in str(e.value)


def test_psnr() -> None:
    a = np.zeros((4, 4, 3), np.float32)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    assert psnr(np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8)) == 0.0


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_few_step_schedulers_generate(tiny_model: Path, name: str) -> None:
    from PIL import Image

    from cvgen.pipeline import load_img2img

    pipe = load_img2img(tiny_model, device="cpu", dtype="float32", scheduler=name)
    assert type(pipe.scheduler).__name__ == {"lcm": "LCMScheduler", "tcd": "TCDScheduler"}[name]
    photo = Image.new("RGB", (64, 64), (120, 100, 90))
    out = pipe(
        prompt="a portrait",
        image=photo,
        strength=0.6,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()
