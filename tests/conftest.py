"""Shared fixtures: the tiny random SD model and the sample portraits, built once per session."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cvgen.perf import flush_denormal_enabled

# Nothing in the tests may reach the network or write outside tmp dirs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))
_FLUSH_AT_START = flush_denormal_enabled()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random SD model as a diffusers folder (built once per test session)."""
    from cvgen.modelzoo import save_random_model

    return save_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded sample portraits in the cvgen data layout (built once per session)."""
    from cvgen.data.sample import write_sample_set

    return write_sample_set(tmp_path_factory.mktemp("data") / "sample", size=96)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model: Path):
    """A StableDiffusionImg2ImgPipeline on the tiny model (CPU, fp32); do not mutate it."""
    from cvgen.pipeline import load_img2img

    return load_img2img(tiny_model, device="cpu", dtype="float32")


def make_random_lora(
    base: Path,
    out: Path,
    seed: int = 1,
    info: dict[str, Any] | None = None,
    alpha: float | None = None,
    kohya: bool = False,
) -> Path:
    """A rank-4 LoRA with visible (random, non-zero) weights on a model's UNet, saved by
    cvgen.lora (with ``info`` as its cvgen_lora.json, and a kohya-format file beside the
    diffusers one with ``kohya``). Returns the diffusers file."""
    from diffusers import UNet2DConditionModel

    from cvgen.lora import LoRASpec, add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    unet.requires_grad_(False)
    params = add_lora(unet, LoRASpec(rank=4, alpha=alpha))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return save_lora(out, unet, kohya=kohya, info=info)


@pytest.fixture(scope="session")
def fp32_reference(tiny_pipeline: Any) -> np.ndarray:
    """The tiny pipeline's :func:`img2img_array` in fp32: what the speed levers are held to."""
    return img2img_array(tiny_pipeline)


def img2img_array(pipe: Any, guidance_scale: float = 5.0) -> np.ndarray:
    """A few seeded img2img steps of ``pipe`` on a fixed random 64 px photo, as an array."""
    from PIL import Image

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    out = pipe(
        prompt="a professional portrait",
        image=photo,
        strength=0.75,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(out.images[0])


@pytest.fixture(scope="session")
def random_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA file with random non-zero weights for the tiny model (built once per session)."""
    return make_random_lora(tiny_model, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="session")
def two_loras(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA folders with different random weights and a cvgen_lora.json each, by name."""
    root = tmp_path_factory.mktemp("loras")
    return {
        name: make_random_lora(
            tiny_model,
            root / name,
            seed=seed,
            info={"base": str(tiny_model), "global_step": 100 * seed, "data_version": f"v{seed}"},
        ).parent
        for name, seed in (("grey", 1), ("warm", 2))
    }


@pytest.fixture(scope="session")
def portraits() -> dict[str, bytes]:
    """The raw sample portraits (as a user would upload them), by name: one face each."""
    from cvgen.data.sample import sample_sources

    return {name: path.read_bytes() for name, path in sample_sources().items()}


@contextlib.contextmanager
def served(server: Any) -> Iterator[Any]:
    """A TestClient on a LitServer started in-process, once ``/health`` answers 200 (the
    worker has loaded the model)."""
    from fastapi.testclient import TestClient
    from litserve.utils import wrap_litserve_start

    with wrap_litserve_start(server) as s, TestClient(s.app) as c:
        for _ in range(600):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the server never became healthy")
        yield c


def send_together(
    send: Callable[[Any], Any], jobs: dict[str, Any], timeout: float = 300
) -> dict[str, Any]:
    """``send(job)`` for every job at once (threads released together, so a server can batch
    them); the answers by key."""
    results: dict[str, Any] = {}
    barrier = threading.Barrier(len(jobs))

    def run(key: str, job: Any) -> None:
        barrier.wait()
        results[key] = send(job)

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results


def scrape(client: Any, headers: dict[str, str] | None = None) -> dict[str, float]:
    """The server's /metrics as {sample with labels: value}."""
    out = {}
    for line in client.get("/metrics", headers=headers).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_float_state():
    """Some tests turn on cvgen's flush-denormal lever (process-global CPU state, which
    hypothesis refuses to run under), module fixtures too: reset it after each test."""
    yield
    torch.set_flush_denormal(_FLUSH_AT_START)
