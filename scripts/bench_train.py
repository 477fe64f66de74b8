#!/usr/bin/env python
"""Training throughput: cvgen (with and without the latent cache) against a plain PyTorch loop
equivalent to diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` (VAE encode,
text encode, UNet forward/backward and a LoRA optimizer step every iteration), on the same
model, data, batch size and resolution, in the same run.

Each configuration runs in its own subprocess (so peak memory is its own and process-wide
settings do not leak); the parent prints a table and the ratios, and optionally writes JSON.

    python scripts/bench_train.py                        # tiny model, 64 px, CPU
    python scripts/bench_train.py --arch mid             # mid-size UNet, 128 px, CPU
    python scripts/bench_train.py --arch small           # SD 1.5 at 1/4 width, 128 px, CPU
    python scripts/bench_train.py --arch sd15 --device cuda --precision bf16-mixed \\
        --resolution 512 --batch-size 8                  # SD 1.5 architecture on a GPU

Modes: ``plain`` (the diffusers-example loop as it is), ``plain-ftz`` (the same with denormals
flushed to zero, cvgen's CPU default, for a like-for-like view), ``cvgen`` (Lightning, no
cache), ``cvgen-cache`` (Lightning, cached latents and text embeddings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("plain", "plain-ftz", "cvgen", "cvgen-cache")
MID_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (64, 128, 128),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
DEFAULT_RES = {"tiny": 64, "mid": 128, "small": 128, "sd15": 512}


# ----------------------------------------------------------------- preparation
def prepare_model(arch: str, workdir: Path) -> Path:
    """A random model folder for ``arch`` (tiny, mid, small or sd15), built once per workdir."""
    from cvgen.modelzoo import save_random_model

    out = workdir / f"model-{arch}"
    if (out / "model_index.json").is_file():
        return out
    if arch == "mid":
        import torch
        from diffusers import UNet2DConditionModel

        save_random_model(out, "tiny", seed=0)
        torch.manual_seed(0)
        shutil.rmtree(out / "unet")
        unet: Any = UNet2DConditionModel(**MID_UNET)  # diffusers' mixins are untyped
        unet.save_pretrained(out / "unet")
        (out / "cvgen_model.json").write_text(json.dumps({"arch": "mid", "random": True}))
    else:
        save_random_model(out, arch, seed=0)
    return out


def prepare_data(workdir: Path, images: int, size: int) -> Path:
    """The sample portraits repeated to ``images`` files (distinct names and captions)."""
    from cvgen.data.metadata import write_metadata
    from cvgen.data.sample import write_sample_set

    out = workdir / f"data-{images}-{size}"
    if (out / "metadata.jsonl").is_file():
        return out
    src = write_sample_set(workdir / f"sample-{size}", size=size)
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    (out / "images").mkdir(parents=True, exist_ok=True)
    new = []
    for i in range(images):
        row = rows[i % len(rows)]
        name = f"images/{i:05d}-{Path(row['file_name']).name}"
        shutil.copyfile(src / row["file_name"], out / name)
        new.append({"file_name": name, "text": f"{row['text']}, take {i // len(rows)}"})
    write_metadata(out, new)
    return out


# --------------------------------------------------------------------- workers
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory(device: str) -> dict[str, float]:
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def worker_plain(args: argparse.Namespace, ftz: bool) -> dict[str, Any]:
    """The diffusers example's inner loop, with nothing of cvgen's training code."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from torch.utils.data import DataLoader
    from transformers import CLIPTextModel, CLIPTokenizer

    from cvgen.data.dataset import PortraitDataset, collate
    from cvgen.data.metadata import read_metadata

    torch.manual_seed(0)
    dev, base = args.device, args.model
    bf16 = args.precision == "bf16-mixed"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    for m in (te, vae, unet):
        m.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    for m in (te, vae, unet):
        m.to(dev, dtype=dtype)
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    records = read_metadata(args.data)
    res = args.resolution
    ds = PortraitDataset(records, [(res, res)] * len(records), seed=0)
    dl = DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=dev.startswith("cuda"),
        persistent_workers=args.workers > 0,
    )
    total = args.warmup + args.steps
    ends: list[float] = []
    flops: dict[str, float] = {}
    unet.train()
    # after the imports: some of them reset the CPU's floating-point control flags
    torch.set_flush_denormal(ftz)

    def step(batch: dict[str, Any], count: bool = False) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        px = batch["pixel_values"].to(dev, dtype, non_blocking=True)
        counter = FlopCounterMode(display=False) if count else None
        with torch.no_grad(), counter or _null():
            latents = vae.encode(px).latent_dist.sample() * vae.config.scaling_factor
            ids = tok(
                batch["text"],
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(dev)
            ehs = te(ids)[0]
        if counter is not None:
            flops["encoders"] = counter.get_total_flops() / px.shape[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=dev)
        noisy = sched.add_noise(latents, noise, t)
        counter = FlopCounterMode(display=False) if count else None
        with counter or _null(), torch.autocast(dev.split(":")[0], dtype, enabled=bf16):
            pred = unet(noisy, t, ehs).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
        if counter is not None:
            flops["unet_train"] = counter.get_total_flops() / px.shape[0]
        opt.step()
        opt.zero_grad(set_to_none=True)

    while len(ends) < total:
        for batch in dl:
            step(batch)
            _sync(dev)
            ends.append(time.perf_counter())
            if len(ends) >= total:
                break
    if args.flops:
        step(next(iter(dl)), count=True)
    return {"ends": ends, "flops_per_image": flops, **_peak_memory(dev)}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def worker_cvgen(args: argparse.Namespace, cache: bool) -> dict[str, Any]:
    """cvgen's LightningModule and DataModule under a Lightning Trainer."""
    import lightning.pytorch as pl

    from cvgen.data.datamodule import PortraitDataModule
    from cvgen.perf import SpeedLevers
    from cvgen.training.module import LoRADiffusion

    dev = args.device
    ends: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *a: Any) -> None:
            _sync(dev)
            ends.append(time.perf_counter())

    pl.seed_everything(0, verbose=False)
    model = LoRADiffusion(
        base=str(args.model),
        rank=4,
        learning_rate=1e-4,
        lr_scheduler="constant",
        gradient_checkpointing=args.gradient_checkpointing,
        # the CPU levers as configs/lora.yaml sets them
        levers=SpeedLevers(
            channels_last=args.channels_last,
            compile_unet=args.compile,
            retain_cpu_memory=True,
        ),
    )
    cache_dir = Path(args.workdir) / "latent-cache"
    if cache and args.fresh_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
    dm = PortraitDataModule(
        root=str(args.data),
        resolution=args.resolution,
        batch_size=args.batch_size,
        num_workers=args.workers,
        val_fraction=0.0,
        max_val=0,
        pin_memory=dev.startswith("cuda"),
        persistent_workers=args.workers > 0,
        cache_latents=cache,
        cache_dir=str(cache_dir),
    )
    trainer = pl.Trainer(
        accelerator="cuda" if dev.startswith("cuda") else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[Timer()],
        default_root_dir=str(Path(args.workdir) / "runs"),
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    out: dict[str, Any] = {"ends": ends, "fit_seconds": time.perf_counter() - t0}
    if dm.latent_cache is not None:
        out["cache_seconds"] = dm.latent_cache.seconds
        out["cache_hit"] = dm.latent_cache.hit
    out["cache_status"] = dm.cache_status
    return {**out, **_peak_memory(dev)}


# ---------------------------------------------------------------------- parent
def run_worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", mode, *sys.argv[1:]]
    cmd = [c for c in cmd if c != "--json" and not c.endswith(".json")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise SystemExit(f"worker {mode} failed (exit {proc.returncode})")


def summarize(mode: str, raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    ends = raw["ends"][args.warmup - 1 :]
    steps = len(ends) - 1
    seconds = ends[-1] - ends[0]
    row = {
        "mode": mode,
        "images_per_s": steps * args.batch_size / seconds,
        "step_ms": 1000 * seconds / steps,
        **{k: v for k, v in raw.items() if k not in ("ends",)},
    }
    return row


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name()}"
    return desc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=("tiny", "mid", "small", "sd15"), default="tiny")
    p.add_argument("--resolution", type=int, default=None, help="default: tiny 64, mid 128")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--images", type=int, default=32, help="training images")
    p.add_argument("--workers", type=int, default=1, help="data-loader processes")
    p.add_argument(
        "--threads", type=int, default=1, help="torch compute threads (CPU); 0: torch's default"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=1, help="interleaved runs of every mode")
    p.add_argument("--channels-last", action="store_true", help="cvgen: channels_last")
    p.add_argument("--compile", action="store_true", help="cvgen: torch.compile the UNet")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--fresh-cache", action="store_true", help="rebuild the latent cache")
    p.add_argument("--flops", action="store_true", help="count FLOPs (flop_counter) for MFU")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--workdir", default="/tmp/cvgen-bench")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.resolution = args.resolution or DEFAULT_RES[args.arch]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    if args.worker:
        import torch

        # one compute thread by default: on a small machine the modes' loader processes would
        # otherwise compete with the compute threads for the cores, and runs drift more
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        fns = {
            "plain": lambda: worker_plain(args, ftz=False),
            "plain-ftz": lambda: worker_plain(args, ftz=True),
            "cvgen": lambda: worker_cvgen(args, cache=False),
            "cvgen-cache": lambda: worker_cvgen(args, cache=True),
        }
        print("BENCH " + json.dumps(fns[args.worker]()), flush=True)
        return

    t0 = time.perf_counter()
    model = prepare_model(args.arch, workdir)
    data = prepare_data(workdir, args.images, max(256, args.resolution))
    sys.argv += ["--model", str(model), "--data", str(data)]
    # modes run in interleaved rounds (plain, cvgen, ..., plain, cvgen, ...): on a shared
    # machine the load drifts between runs; each mode reports its median round
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for i in range(args.rounds):
        for m in modes:
            runs[m].append(summarize(m, run_worker(m, args), args))
            r = runs[m][-1]  # printed as it comes: a run cut off by a time limit keeps it
            print(
                f"round {i + 1} {m}: {r['images_per_s']:.2f} images/s, {r['step_ms']:.1f} ms/step",
                flush=True,
            )
    rows = []
    for m in modes:
        ranked = sorted(runs[m], key=lambda r: r["images_per_s"])
        row = ranked[len(ranked) // 2]
        row["rounds_images_per_s"] = [round(r["images_per_s"], 3) for r in runs[m]]
        rows.append(row)
    flops = next((r["flops_per_image"] for r in rows if r.get("flops_per_image")), None)
    print(
        f"\ncvgen bench_train  {time.strftime('%Y-%m-%d %H:%M')}  {machine()}\n"
        f"arch={args.arch} resolution={args.resolution} batch={args.batch_size} "
        f"precision={args.precision} images={args.images} workers={args.workers} "
        f"steps={args.steps} (+{args.warmup} warm-up) rounds={args.rounds} (median shown)"
    )
    print(f"{'mode':<13}{'images/s':>10}{'step ms':>10}{'peak RSS MiB':>14}{'peak GPU MiB':>14}")
    for r in rows:
        gpu = f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-"
        print(
            f"{r['mode']:<13}{r['images_per_s']:>10.2f}{r['step_ms']:>10.1f}"
            f"{r['peak_rss_mib']:>14.0f}{gpu:>14}"
        )
        if "cache_seconds" in r:
            print(
                f"{'':13}cache {'hit' if r['cache_hit'] else 'built'} in {r['cache_seconds']:.1f} s"
            )
    # ratios are paired: each round's cvgen run against the plain run of the same round
    # (the machine's load drifts between rounds more than it does within one), median shown
    ratios, spread = {}, {}
    for base in ("plain", "plain-ftz"):
        for m in ("cvgen", "cvgen-cache"):
            if base in runs and m in runs:
                pairs = sorted(
                    a["images_per_s"] / b["images_per_s"]
                    for a, b in zip(runs[m], runs[base], strict=True)
                )
                ratios[f"{m}/{base}"] = statistics.median(pairs)
                spread[f"{m}/{base}"] = (pairs[0], pairs[-1])
    for k, v in ratios.items():
        lo, hi = spread[k]
        rng = f"  (rounds {lo:.2f}x to {hi:.2f}x)" if args.rounds > 1 else ""
        print(f"ratio {k:<24}{v:6.2f}x{rng}")
    if flops:
        enc, train = flops.get("encoders", 0.0), flops.get("unet_train", 0.0)
        print(f"FLOPs per image: encoders {enc / 1e9:.2f} G, UNet fwd+bwd {train / 1e9:.2f} G")
        for r in rows:
            per = train if r["mode"] == "cvgen-cache" else train + enc
            r["tflops_per_s"] = per * r["images_per_s"] / 1e12
            if args.peak_tflops:
                r["mfu"] = r["tflops_per_s"] / args.peak_tflops
            mfu = f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
            print(f"  {r['mode']:<13}{r['tflops_per_s']:8.3f} TFLOP/s{mfu}")
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        out = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": machine(),
            "args": {k: v for k, v in vars(args).items() if k not in ("worker",)},
            "rows": rows,
            "ratios": ratios,
            "ratio_range": spread,
            "flops_per_image": flops,
        }
        from cvgen.fsutil import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
