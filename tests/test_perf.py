"""Speed levers switch on from YAML / config, in training and in serving."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cvgen import perf
from cvgen.accel import ServeLevers
from cvgen.data.datamodule import PortraitDataModule
from cvgen.perf import SpeedLevers
from cvgen.serve.config import ServeConfig, load_config
from cvgen.training.cli import CVGenCLI
from cvgen.training.module import LoRADiffusion

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_tf32():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    torch.set_flush_denormal(False)


def conv_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def processors(model: Any) -> set[str]:
    return {type(p).__name__ for p in model.attn_processors.values()}


def test_training_levers_switch_on_from_yaml(
    tiny_model: Path, sample_data: Path, tmp_path: Path, restore_tf32
) -> None:
    cli = CVGenCLI(
        LoRADiffusion,
        PortraitDataModule,
        run=False,
        seed_everything_default=0,
        args=[
            *("--config", str(ROOT / "configs" / "demo.yaml")),
            *("--model.base", str(tiny_model), "--data.root", str(sample_data)),
            *("--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"),
            *("--model.levers.channels_last", "true", "--model.levers.compile_unet", "true"),
            *("--model.levers.attention", "default", "--model.levers.allow_tf32", "false"),
            *("--model.levers.flush_denormal", "true"),
        ],
    )
    model = cli.model
    assert not perf.is_compiled(model.unet)
    model.setup("fit")
    assert perf.is_compiled(model.unet)  # compiled lazily, on the first call
    assert conv_weight(model.unet).is_contiguous(memory_format=torch.channels_last)
    assert conv_weight(model.vae).is_contiguous(memory_format=torch.channels_last)
    assert processors(model.unet) == {"AttnProcessor"}
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.tensor(1e-40).item() == 0.0  # flush_denormal: opt-in, switched on above
    # parameter names (checkpoints, LoRA export) are unchanged by compiling in place
    assert all("_orig_mod" not in n for n, _ in model.unet.named_parameters())


def test_training_defaults_use_sdpa_and_no_compile(tiny_model: Path, restore_tf32) -> None:
    model = LoRADiffusion(base=str(tiny_model))
    model.setup("fit")
    assert processors(model.unet) == {"AttnProcessor2_0"}
    assert not perf.is_compiled(model.unet)
    assert not conv_weight(model.unet).is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.tensor(1e-40).item() != 0.0  # flush_denormal is opt-in


# Training's allocation pattern in miniature: a large block freed, then many mid-size ones
# freed together. glibc's own thresholds move with the process's allocation history, so the
# comparison pins them: "glibc" sets its documented starting values (128 KiB mmap and trim
# thresholds), under which the freed memory goes back to the OS and every round faults it in
# again; "retain" applies the lever.
CHURN = """
import ctypes, resource, sys, torch
from cvgen import perf
if sys.argv[1] == "retain":
    took = perf.retain_cpu_memory()
else:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    took = mallopt(-3, 128 * 1024) == 1 and mallopt(-1, 128 * 1024) == 1
def churn():
    for _ in range(10):
        big = torch.ones(30 * 2**18)
        del big
        blocks = [torch.ones(2 * 2**20) for _ in range(10)]
        del blocks
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, threads: int) -> tuple[bool, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.parametrize("threads", [1, 2])
def test_retain_cpu_memory_stops_the_page_faults_of_freed_memory(threads: int) -> None:
    took, retained = page_faults("retain", threads)
    if not took:
        pytest.skip("this C library has no mallopt (not glibc)")
    assert page_faults("glibc", threads)[1] > 50_000  # 10 rounds x 110 MiB, re-faulted
    assert retained < 1_000


def test_retain_cpu_memory_follows_the_hyperparameter(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, restore_tf32
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(perf, "retain_cpu_memory", lambda on=True: calls.append(on) or on)
    for on in (True, False):
        LoRADiffusion(base=str(tiny_model), levers=SpeedLevers(retain_cpu_memory=on)).setup("fit")
    assert calls == [True, False]


def test_attention_kinds_give_the_same_output(tiny_model: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        perf.set_attention(unet, "default")
        ref = unet(x, 10, cond).sample
        perf.set_attention(unet, "sdpa")
        torch.testing.assert_close(unet(x, 10, cond).sample, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        perf.set_attention(unet, "xformers")


def test_serve_yaml_levers_parse_and_are_checked() -> None:
    cfg = load_config(ROOT / "configs" / "serve.yaml")
    raw = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    keys = [f.name for f in dataclasses.fields(ServeLevers)]
    for key in keys:
        assert getattr(cfg.levers, key) == raw["levers"][key], key
    assert cfg.warmup == raw["warmup"]
    from cvgen.errors import CVGenError

    with pytest.raises(CVGenError, match="compile_mode"):
        load_config(overrides={"levers": {"compile_mode": "fastest"}})


class RecordingPipe:
    """Wraps a pipeline and records the batch size of each call."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kw: Any) -> Any:
        self.calls.append(len(kw["prompt"]))
        return self.pipe(**kw)


def test_serve_levers_and_warmup(tiny_model: Path, restore_tf32) -> None:
    from cvgen.pipeline import load_pipelines
    from cvgen.serve.engine import Img2ImgEngine

    levers = ServeLevers(
        channels_last=True, compile_unet=True, attention="default", allow_tf32=False
    )
    cfg = ServeConfig(
        base=str(tiny_model), device="cpu", max_batch_size=3, default_steps=4, levers=levers
    )
    pipes = load_pipelines(tiny_model, {}, device="cpu", dtype="float32")
    pipe = pipes.inpaint = RecordingPipe(pipes.inpaint)  # warm-up runs the default: keep_face
    engine = Img2ImgEngine(pipes, cfg, "cpu")
    done = engine.apply_levers()
    assert done.startswith("attention=default, channels_last, compile_unet(default), ")
    assert perf.is_compiled(pipe.unet) and processors(pipe.unet) == {"AttnProcessor"}
    assert conv_weight(pipe.unet).is_contiguous(memory_format=torch.channels_last)
    # compiled: every batch size batching can form is warmed up, so none recompiles later
    assert engine.warmup_batch_sizes() == [1, 2, 3]
    engine.cfg = cfg.model_copy(update={"levers": dataclasses.replace(levers, compile_unet=False)})
    pipe.pipe.unet._compiled_call_impl = None  # run eagerly here: compiling takes minutes on CPU
    assert engine.warmup_batch_sizes() == [1, 3]
    engine.warmup()
    assert pipe.calls == [1, 3]


def test_adamw_is_fused_on_cpu(tiny_model: Path, restore_tf32) -> None:
    model = LoRADiffusion(base=str(tiny_model))
    model.setup("fit")
    opt = model.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    params = [p for g in opt.param_groups for p in g["params"]]
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)


def test_adamw_keeps_foreach_under_mixed_precision(tiny_model: Path, restore_tf32) -> None:
    class FakeTrainer:  # Lightning refuses gradient clipping with fused optimizers under AMP
        precision = "bf16-mixed"
        estimated_stepping_batches = 10

    model = LoRADiffusion(base=str(tiny_model))
    model._trainer = FakeTrainer()  # type: ignore[assignment]
    model.setup("fit")
    opt = model.configure_optimizers()["optimizer"]
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is True
