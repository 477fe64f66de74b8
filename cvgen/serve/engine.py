"""The img2img engine behind both ``cvgen serve`` and ``cvgen generate``.

It owns the diffusers pipeline (base model + LoRA, fused when the scale is fixed), applies the
speed levers, and runs batches: requests that share :attr:`GenParams.BATCH_KEY` go through one
pipeline call, each with its own prompt and seeded generator, so the same seed and inputs give
the same image.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from cvgen.serve.config import ServeConfig
from cvgen.serve.schema import GenParams, GenRequest, GenResult

log = logging.getLogger(__name__)


def group_by_key(requests: Sequence[GenRequest]) -> list[list[int]]:
    """Indices of ``requests`` grouped by :meth:`GenParams.batch_key`, in arrival order."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.params.batch_key(), []).append(i)
    return list(groups.values())


class Img2ImgEngine:
    """A loaded pipeline that turns :class:`GenRequest` lists into :class:`GenResult` lists."""

    def __init__(self, pipe: Any, cfg: ServeConfig, device: str) -> None:
        self.pipe = pipe
        self.cfg = cfg
        self.device = device
        self.resolution = cfg.image_size

    @classmethod
    def load(cls, cfg: ServeConfig, device: str | None = None) -> Img2ImgEngine:
        """Load the base model and LoRA named in ``cfg`` (``cfg.lora`` must be a local path)."""
        from cvgen.pipeline import load_img2img, resolve_device

        dev = resolve_device(device or cfg.device)
        t0 = time.perf_counter()
        pipe = load_img2img(
            cfg.base,
            cfg.lora,
            lora_scale=cfg.lora_scale,
            fuse=cfg.fuse_lora,
            device=dev,
            dtype=cfg.dtype,
            scheduler=cfg.scheduler,
        )
        log.info(
            "model loaded: base=%s lora=%s fused=%s device=%s in %.1f s",
            cfg.base,
            cfg.lora,
            cfg.fuse_lora,
            dev,
            time.perf_counter() - t0,
        )
        engine = cls(pipe, cfg, dev)
        engine.apply_levers()
        if cfg.warmup:
            engine.warmup()
        return engine

    def apply_levers(self) -> str:
        """The config's speed levers (:class:`cvgen.perf.SpeedLevers`) on this pipeline; returns
        the line it logs."""
        done = self.cfg.levers.apply(
            self.pipe.unet, others=(self.pipe.vae,), cpu=self.device == "cpu"
        )
        log.info("speed levers: %s", done)
        return done

    def warmup_batch_sizes(self) -> list[int]:
        """Batch sizes run at start-up: 1 and the largest (and, compiled, the ones between
        that batching can form, so no request pays for a recompile)."""
        top = self.cfg.max_batch_size
        if self.cfg.levers.compile_unet:
            return list(range(1, top + 1))
        return sorted({1, top})

    def warmup(self) -> float:
        """Run the default request at each warm-up batch size (compiles the UNet, fills the
        allocator and kernel caches); returns the seconds it took."""
        t0 = time.perf_counter()
        size = self.resolution
        image = Image.new("RGB", (size, size), (128, 110, 100))
        params = GenParams.parse({"prompt": "warm-up", "seed": 0}, self.cfg)  # the defaults
        for n in self.warmup_batch_sizes():
            self.generate([GenRequest(image, params)] * n)
        seconds = time.perf_counter() - t0
        log.info("warm-up: batch sizes %s in %.1f s", self.warmup_batch_sizes(), seconds)
        return seconds

    def _generator(self, seed: int) -> torch.Generator:
        # CPU generators give the same noise on every device, so a seed means the same image
        return torch.Generator(device="cpu").manual_seed(seed)

    @torch.inference_mode()
    def _run_group(self, requests: Sequence[GenRequest]) -> list[Image.Image]:
        p = requests[0].params
        kwargs: dict[str, Any] = {}
        if self.cfg.lora_loaded and self.cfg.fixed_lora_scale is None:
            kwargs["cross_attention_kwargs"] = {"scale": p.lora_scale}
        out = self.pipe(
            prompt=[r.params.prompt for r in requests],
            negative_prompt=[r.params.negative_prompt for r in requests],
            image=[r.image for r in requests],
            strength=p.strength,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            generator=[self._generator(r.params.seed) for r in requests],
            output_type="pil",
            **kwargs,
        )
        return list(out.images)

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """One result per request, in order; compatible requests share a pipeline call."""
        results: list[GenResult | None] = [None] * len(requests)
        for idx in group_by_key(requests):
            group = [requests[i] for i in idx]
            t0 = time.perf_counter()
            images = self._run_group(group)
            seconds = time.perf_counter() - t0
            memory = self.memory()
            for pos, (i, img) in enumerate(zip(idx, images, strict=True)):
                results[i] = GenResult(img, requests[i].params, len(idx), pos, seconds, memory)
        return [r for r in results if r is not None]

    def memory(self) -> dict[str, int]:
        """Resident memory of this process and, on CUDA, allocated GPU memory (bytes)."""
        out = {"rss_bytes": process_rss_bytes()}
        if self.device.startswith("cuda") and torch.cuda.is_available():
            out["gpu_bytes"] = int(torch.cuda.memory_allocated())
        return out


def process_rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
