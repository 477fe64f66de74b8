"""The portrait engine behind both ``cvgen serve`` and ``cvgen generate``.

It owns the pipelines (:class:`cvgen.pipeline.Pipelines`: img2img and inpainting on one base
model, every LoRA an adapter on it, one fused where it is the only one), applies the speed
levers, and runs batches: requests that share :attr:`GenParams.BATCH_KEY` (LoRA included: a
batch never mixes LoRAs) go through one pipeline call, each with its own prompt and seeded
generator, so the same seed and inputs give the same image. ``keep_face`` requests go through
the inpainting pipeline with a mask around the head and get the photo's face composited back
(:mod:`cvgen.portrait`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from cvgen import portrait
from cvgen.faces import Box
from cvgen.pipeline import Pipelines
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
    """Loaded pipelines that turn :class:`GenRequest` lists into :class:`GenResult` lists."""

    def __init__(self, pipes: Pipelines, cfg: ServeConfig, device: str) -> None:
        self.pipes = pipes
        self.pipe = pipes.img2img
        self.cfg = cfg
        self.device = device
        self.scale_factor = cfg.scale_factor

    @classmethod
    def load(cls, cfg: ServeConfig, device: str | None = None) -> Img2ImgEngine:
        """Load the base model and the LoRAs named in ``cfg`` (local paths by now)."""
        from cvgen.pipeline import load_pipelines, resolve_device

        dev = resolve_device(device or cfg.device)
        t0 = time.perf_counter()
        pipes = load_pipelines(
            cfg.base,
            cfg.lora_map,
            lora_scale=cfg.lora_scale,
            fuse=cfg.fuse_lora,
            device=dev,
            dtype=cfg.dtype,
            scheduler=cfg.scheduler,
            speed_lora=cfg.speed_lora,
            speed_lora_scale=cfg.speed_lora_scale,
        )
        log.info(
            "model loaded: base=%s loras=%s default=%s speed_lora=%s fused=%s device=%s in %.1f s",
            cfg.base,
            ",".join(f"{k}={v}" for k, v in cfg.lora_map.items()) or "none",
            cfg.default_lora_name,
            cfg.speed_lora or "none",
            pipes.fused,
            dev,
            time.perf_counter() - t0,
        )
        engine = cls(pipes, cfg, dev)
        engine.apply_levers()
        if cfg.warmup:
            engine.warmup()
        return engine

    def apply_levers(self) -> str:
        """The config's speed levers (:class:`cvgen.accel.ServeLevers`) on this pipeline (the
        inpainting pipeline shares its modules); returns the line it logs."""
        cpu = self.device == "cpu"
        workers = self.cfg.workers_per_device if cpu else 1
        done = self.cfg.levers.apply_pipeline(self.pipe, cpu=cpu, workers=workers)
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
        allocator and kernel caches); returns the seconds it took. Other framings' image sizes
        are first run (and, compiled, compiled) by the first request that asks for them."""
        t0 = time.perf_counter()
        params = GenParams.parse({"prompt": "warm-up", "seed": 0}, self.cfg)  # the defaults
        w, h = self.cfg.framed_size(params.framing)
        image = Image.new("RGB", (w, h), (128, 110, 100))
        face = Box(w // 3, h // 4, w // 3, w // 3)  # where head_and_shoulders puts a face
        for n in self.warmup_batch_sizes():
            self.generate([GenRequest(image, params, face=face)] * n)
        seconds = time.perf_counter() - t0
        log.info("warm-up: batch sizes %s in %.1f s", self.warmup_batch_sizes(), seconds)
        return seconds

    def _generator(self, seed: int) -> torch.Generator:
        # CPU generators give the same noise on every device, so a seed means the same image
        return torch.Generator(device="cpu").manual_seed(seed)

    @torch.inference_mode()
    def _run_group(
        self, requests: Sequence[GenRequest]
    ) -> tuple[list[Image.Image], list[dict[str, float]]]:
        """One pipeline call for requests that share a batch key; the images and, per image,
        the seconds each stage took (``generate``: the pipeline call, for the whole batch;
        ``mask`` and ``composite``: keep-face's work for this image)."""
        p = requests[0].params
        self.pipes.select(p.lora or self.cfg.default_lora_name, p.lora_scale)
        common: dict[str, Any] = {
            "prompt": [r.params.prompt for r in requests],
            "negative_prompt": [r.params.negative_prompt for r in requests],
            "image": [r.image for r in requests],
            "strength": p.strength,
            "num_inference_steps": p.steps,
            "guidance_scale": p.guidance_scale,
            "generator": [self._generator(r.params.seed) for r in requests],
            "output_type": "pil",
        }
        if not p.keep_face:
            t0 = time.perf_counter()
            images = list(self.pipes.img2img(**common).images)
            return images, [{"generate": time.perf_counter() - t0} for _ in requests]
        t0 = time.perf_counter()
        keeps, repaints = [], []
        for r in requests:
            assert r.face is not None, "keep_face requests have a face (checked on arrival)"
            keeps.append(portrait.keep_mask(r.image.size, r.face))
            repaints.append(portrait.repaint_mask(r.image.size, r.face, self.scale_factor))
        mask_s = (time.perf_counter() - t0) / len(requests)
        w, h = requests[0].image.size
        # a 4-channel UNet never reads masked-image latents: zeros skip a VAE encode per image
        unused = torch.zeros(len(requests), 4, h // self.scale_factor, w // self.scale_factor)
        t1 = time.perf_counter()
        images = self.pipes.inpaint(
            **common, mask_image=repaints, masked_image_latents=unused, width=w, height=h
        ).images
        generate_s = time.perf_counter() - t1
        out, timings = [], []
        for r, generated, keep in zip(requests, images, keeps, strict=True):
            t2 = time.perf_counter()
            out.append(portrait.composite(r.image, generated, keep))
            stages = {"mask": mask_s, "generate": generate_s}
            timings.append({**stages, "composite": time.perf_counter() - t2})
        return out, timings

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """One result per request, in order; compatible requests share a pipeline call."""
        results: list[GenResult | None] = [None] * len(requests)
        for idx in group_by_key(requests):
            group = [requests[i] for i in idx]
            t0 = time.perf_counter()
            images, stages = self._run_group(group)
            seconds = time.perf_counter() - t0
            memory = self.memory()
            cpu = time.process_time()
            for pos, (i, img, timings) in enumerate(zip(idx, images, stages, strict=True)):
                results[i] = GenResult(
                    img,
                    requests[i].params,
                    len(idx),
                    pos,
                    seconds,
                    memory,
                    timings,
                    worker=worker_id(),
                    cpu_seconds=cpu,
                )
        return [r for r in results if r is not None]

    def memory(self) -> dict[str, int]:
        """Resident memory of this process and, on CUDA, allocated GPU memory (bytes)."""
        out = {"rss_bytes": process_rss_bytes()}
        if self.device.startswith("cuda") and torch.cuda.is_available():
            out["gpu_bytes"] = int(torch.cuda.memory_allocated())
        return out


def worker_id() -> int:
    """LitServe's id of this inference worker (0 in a process LitServe did not start)."""
    value = os.environ.get("LITSERVE_WORKER_ID", "")
    return int(value) if value.isdigit() else 0


def process_rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
