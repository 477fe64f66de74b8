#!/usr/bin/env python
"""The CPU lever table of ``bench_serve.py --lever-table``: latency of one img2img image per
lever (and combination) against the bare fp32 diffusers pipeline on the same model and input,
and the PSNR of each output against that fp32 reference.

A combination is written as ``+``-joined tokens:

    fp32      the bare pipeline: StableDiffusionImg2ImgPipeline, fp32, no lever applied
    bf16      dtype bfloat16 (fp32 with a log line on a CPU without bf16)
    cl        channels_last            compile   compile_unet (CPU: with frozen weights)
    mat       compile_unet in mode max-autotune (inductor's C++ GEMM templates on a CPU)
    i8s       quantize int8-static with compile_unet (int8 convolutions and Linears, calibrated)
    dyn       quantize int8-dynamic    wo        quantize int8-weight (the UNet's Linears)
    tome0.5   token_merging 0.5        dc3       deepcache_interval 3
    s20       20 scheduler steps instead of --steps (a fewer-step schedule: approximate)
    lcm       a few-step LoRA (``speed_lora``: ``--speed-lora``, else a random rank-64 one, as
              LCM-LoRA) fused, the LCM scheduler, 8 steps (or sN), guidance 1: approximate, and
              its PSNR is that of another sampler (a trained LCM-LoRA is judged by eye)

Every combination is its own pipeline in this process, all loaded at once; after one warm-up
call each (the compile), the rounds run them interleaved (A, B, C, A, B, C, ...), so a load that
drifts hits all of them alike. The latency of a lever is its median; its speed-up is the median
of its per-round ratios to the fp32 call of the same round. PSNR is measured on the decoded
image (uint8 RGB), the same photo and seed as the fp32 reference; ``fp32 seed+1`` gives the
scale: the PSNR between two fp32 images of different seeds (a lever far above it moves the
image much less than a new seed does).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvgen.accel import ServeLevers
from cvgen.images import psnr

LCM_STEPS = 8  # lcm's steps unless an sN token says otherwise
TOKENS: dict[str, dict[str, Any]] = {
    "cl": {"channels_last": True},
    "compile": {"compile_unet": True},
    "mat": {"compile_unet": True, "compile_mode": "max-autotune"},
    "i8s": {"compile_unet": True, "quantize": "int8-static"},
    "dyn": {"quantize": "int8-dynamic"},
    "wo": {"quantize": "int8-weight"},
}


@dataclasses.dataclass
class Combo:
    """One column of the table: a dtype, the levers and the step count."""

    name: str
    dtype: str
    levers: ServeLevers | None  # None: the bare pipeline, nothing applied
    steps: int
    fewer_steps: bool = False
    speed_lora: bool = False  # lcm: the few-step LoRA, the LCM scheduler, guidance 1
    guidance: float = 7.0

    @property
    def approximate(self) -> bool:
        return (
            self.fewer_steps
            or self.speed_lora
            or (self.levers is not None and bool(self.levers.approximate))
        )


def parse_combo(name: str, steps: int) -> Combo:
    """``bf16+compile+dyn`` -> Combo (see the module docstring for the tokens)."""
    if name == "fp32":
        return Combo(name, "float32", None, steps)
    dtype, default_steps, lcm = "float32", steps, False
    kw: dict[str, Any] = {}
    tokens = name.split("+")
    if "lcm" in tokens and not any(t.startswith("s") and t[1:].isdigit() for t in tokens):
        steps = LCM_STEPS
    for tok in tokens:
        if tok == "bf16":
            dtype = "bfloat16"
        elif tok == "fp32":
            pass
        elif tok in TOKENS:
            kw.update(TOKENS[tok])
        elif tok.startswith("tome"):
            kw["token_merging"] = float(tok[4:])
        elif tok.startswith("dc"):
            kw["deepcache_interval"] = int(tok[2:])
        elif tok.startswith("s") and tok[1:].isdigit():
            steps = int(tok[1:])
        elif tok == "lcm":
            lcm = True
        else:
            raise SystemExit(f"unknown lever token {tok!r} in {name!r}")
    return Combo(
        name,
        dtype,
        ServeLevers(**kw),
        steps,
        steps < default_steps and not lcm,
        speed_lora=lcm,
        guidance=1.0 if lcm else 7.0,
    )


def random_speed_lora(model: Path, out: Path, rank: int = 64) -> Path:
    """A few-step LoRA stand-in for ``model`` (LCM-LoRA's rank 64 on the UNet), built once in
    ``out``: peft's initialisation (the up factors zero), so it times the path, not a look."""
    from diffusers import UNet2DConditionModel

    from cvgen.lora import DIFFUSERS_WEIGHT_NAME, LoRASpec, add_lora, save_lora

    if not (out / DIFFUSERS_WEIGHT_NAME).is_file():
        unet = UNet2DConditionModel.from_pretrained(model / "unet")
        unet.requires_grad_(False)
        add_lora(unet, LoRASpec(rank=rank))
        save_lora(out, unet, kohya=False)
    return out


def load(model: Path, combo: Combo, speed_lora: Path | None = None) -> Any:
    from cvgen.pipeline import load_img2img, load_pipelines

    if combo.speed_lora:
        lora = speed_lora or random_speed_lora(model, model.parent / f"{model.name}-speed-lora")
        pipe = load_pipelines(
            model, {}, device="cpu", dtype=combo.dtype, scheduler="lcm", speed_lora=lora
        ).img2img
    else:
        pipe = load_img2img(model, device="cpu", dtype=combo.dtype)
    if combo.levers is not None:
        print(f"  {combo.name}: {combo.levers.apply_pipeline(pipe, cpu=True)}", flush=True)
    return pipe


def run_once(pipe: Any, image: Any, args: argparse.Namespace, c: Combo, seed: int = 0) -> Any:
    import torch

    return pipe(
        prompt=["a professional headshot"],
        negative_prompt=[""],
        image=[image],
        strength=args.strength,
        num_inference_steps=c.steps,
        guidance_scale=c.guidance,
        generator=[torch.Generator().manual_seed(seed)],
        output_type="pil",
    ).images[0]


def lever_table(
    args: argparse.Namespace,
    model: Path,
    photo: bytes,
    servers: dict[str, str],
    post: Callable[..., tuple[float, int, dict[str, float]]],
) -> dict[str, Any]:
    """Latency, speed-up over the bare fp32 pipeline and PSNR for each ``--levers`` combo;
    each round also sends one request to each of ``servers`` (name -> URL), so the HTTP
    latencies are paired with the bare calls of the same round, sent with ``post``
    (``bench_serve.post``, handed in so that this module does not import its caller)."""
    import httpx
    import numpy as np
    from PIL import Image

    names = ["fp32", *[n for n in args.levers.split(",") if n and n != "fp32"]]
    combos = [parse_combo(n, args.steps) for n in names]
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    pipes, outputs, first = {}, {}, {}
    for c in combos:
        pipes[c.name] = load(model, c, getattr(args, "speed_lora", None))
        t0 = time.perf_counter()
        outputs[c.name] = np.asarray(run_once(pipes[c.name], image, args, c))
        first[c.name] = time.perf_counter() - t0  # the first call (compiles, if compiled)
        print(f"  {c.name}: first call {first[c.name]:.1f} s", flush=True)
    ref = outputs["fp32"]
    other_seed = np.asarray(run_once(pipes["fp32"], image, args, combos[0], seed=1))
    times: dict[str, list[float]] = {c.name: [] for c in combos}
    http: dict[str, list[float]] = {name: [] for name in servers}
    with httpx.Client() as client:
        for url in servers.values():
            post(client, url, photo, 0)  # each server's first request
        for r in range(args.rounds):
            for c in combos:
                t0 = time.perf_counter()
                out = np.asarray(run_once(pipes[c.name], image, args, c))
                times[c.name].append(time.perf_counter() - t0)
                if not np.array_equal(out, outputs[c.name]):
                    print(f"  note: {c.name} is not deterministic across calls", flush=True)
                if c.name in servers:
                    http[c.name].append(post(client, servers[c.name], photo, 0)[0])
            print(
                f"  round {r + 1}: "
                + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items())
                + "".join(f", HTTP {k} {v[-1]:.1f} s" for k, v in http.items())
            )
    rows = []
    for c in combos:
        ratios = [f / t for f, t in zip(times["fp32"], times[c.name], strict=True)]
        rows.append(
            {
                "levers": c.name,
                "approximate": c.approximate,
                "p50_s": statistics.median(times[c.name]),
                "times_s": times[c.name],
                "first_call_s": first[c.name],
                "speedup": statistics.median(ratios),
                "speedup_range": [min(ratios), max(ratios)],
                "psnr_db": psnr(outputs[c.name], ref),
            }
        )
    for name, lat in http.items():
        ratios = [f / t for f, t in zip(times["fp32"], lat, strict=True)]
        overhead = [h / b - 1 for h, b in zip(lat, times[name], strict=True)]
        row = next(r for r in rows if r["levers"] == name)
        row["http"] = {
            "p50_s": statistics.median(lat),
            "times_s": lat,
            "speedup": statistics.median(ratios),
            "overhead": statistics.median(overhead),
        }
    return {
        "rows": rows,
        "psnr_other_seed_db": psnr(other_seed, ref),
        "psnr_fp32_vs_input_db": psnr(ref, np.asarray(image)),
        "output_std": float(ref.std()),
    }


def start_servers(
    args: argparse.Namespace, model: Path, names: list[str], server_cls: Callable[..., Any]
) -> dict[str, Any]:
    """``cvgen serve`` (max_batch_size 1) for each combo (its dtype and levers), all started
    at once and ready before the table's rounds; name -> ``server(...)`` (bench_serve's
    ``Server``, handed in so that this module does not import its caller)."""
    servers: dict[str, Any] = {}
    for name in names:
        c = parse_combo(name, args.steps)
        if c.speed_lora:
            raise SystemExit(f"{name}: lcm is timed on the bare pipeline only, not over HTTP")
        a = copy.copy(args)
        a.dtype, a.steps = c.dtype, c.steps
        servers[name] = server_cls(
            a, model, 1, Path(args.workdir), levers=c.levers or ServeLevers(), tag=name
        )
    for name, server in servers.items():
        print(f"  HTTP {name}: ready in {server.wait_ready(args.ready_timeout):.0f} s", flush=True)
    return servers


def print_table(result: dict[str, Any]) -> None:
    t = result["lever_table"]
    print(f"{'levers':<28}{'p50 s':>8}{'speed-up':>10}{'(rounds)':>16}{'PSNR dB':>9}{'HTTP s':>8}")
    for r in t["rows"]:
        lo, hi = r["speedup_range"]
        h = r.get("http", {}).get("p50_s")
        print(
            f"{r['levers'] + (' *' if r['approximate'] else ''):<28}{r['p50_s']:>8.1f}"
            f"{r['speedup']:>9.2f}x{f'{lo:.2f}-{hi:.2f}x':>16}{r['psnr_db']:>9.1f}"
            f"{(f'{h:.1f}' if h else '-'):>8}"
        )
    print(
        f"(* approximate) PSNR scale: fp32 with another seed {t['psnr_other_seed_db']:.1f} dB; "
        f"fp32 output vs the input photo {t['psnr_fp32_vs_input_db']:.1f} dB"
    )
