"""Evaluate a trained LoRA run: the ``evaluate`` stage of ``dvc.yaml``.

Writes, all atomically:
- ``OUT/metrics.json``: the last validation and training loss of the run (from its CSV log),
  and how close img2img outputs with the LoRA stay to their held-out inputs (PSNR in dB,
  SSIM, mean absolute pixel error; no learned metric such as LPIPS, so nothing to download);
  the DVC data version the run trained on;
- ``OUT/plots/train_loss.csv`` and ``OUT/plots/val_loss.csv``: loss per step, for
  ``dvc plots show`` / ``dvc plots diff``;
- ``OUT/samples/grid.png``: input | output rows on the held-out photos.

Usage: python scripts/evaluate.py --run runs/dvc --data data/prepared --base models/tiny --out eval
       [--wandb wandb://ENTITY/PROJECT/COLLECTION:v3]   (also record the scores on that LoRA)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np


def read_losses(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{"train/loss": [(step, value), ...], "val/loss": [...]} from a Lightning CSVLogger file."""
    out: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            for key, series in out.items():
                value = row.get(key)
                if value not in (None, ""):
                    series.append((int(row["step"]), float(value)))
    return out


def similarity(a: Any, b: Any) -> dict[str, float]:
    """PSNR (dB), SSIM and mean absolute error (0-255) of two RGB images of one size."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    psnr = float(peak_signal_noise_ratio(x, y, data_range=255))
    return {
        "psnr": psnr if math.isfinite(psnr) else 100.0,
        "ssim": float(structural_similarity(x, y, channel_axis=2, data_range=255)),
        "mae": float(np.abs(x - y).mean()),
    }


def _write_csv(path: Path, header: tuple[str, str], rows: list[tuple[int, float]]) -> None:
    from cvgen.fsutil import atomic_write_text

    text = ",".join(header) + "\n" + "".join(f"{s},{v:.6f}\n" for s, v in rows)
    atomic_write_text(path, text)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cvgen.data.metadata import read_metadata, split_records
    from cvgen.data.version import find_data_version
    from cvgen.fsutil import atomic_write_text
    from cvgen.images import make_grid, open_image, resize_and_crop, save_image_atomic
    from cvgen.pipeline import load_img2img

    run, out = Path(args.run), Path(args.out)
    logs = sorted(run.glob("csv/*/metrics.csv"))
    if not logs:
        raise SystemExit(f"evaluate: no CSV log under {run}/csv (train with a CSVLogger)")
    losses = read_losses(logs[-1])
    _write_csv(out / "plots" / "train_loss.csv", ("step", "train_loss"), losses["train/loss"])
    _write_csv(out / "plots" / "val_loss.csv", ("step", "val_loss"), losses["val/loss"])

    _, val = split_records(read_metadata(args.data), args.val_fraction, args.max_val)
    pipe = load_img2img(args.base, lora=run / "lora", device="cpu", dtype="float32")
    scores: list[dict[str, float]] = []
    rows = []
    for i, rec in enumerate(val[: args.num_images]):
        image = resize_and_crop(open_image(rec.path), args.resolution, args.resolution)
        result = pipe(
            prompt=rec.text,
            image=image,
            strength=args.strength,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator().manual_seed(args.seed + i),
        ).images[0]
        scores.append(similarity(image, result.resize(image.size)))
        rows.append([image, result])
    if rows:
        save_image_atomic(make_grid(rows), out / "samples" / "grid.png")
    version = find_data_version(args.data)
    metrics: dict[str, Any] = {
        "val_loss": losses["val/loss"][-1][1] if losses["val/loss"] else None,
        "train_loss": losses["train/loss"][-1][1] if losses["train/loss"] else None,
        "steps": max((s for s, _ in losses["train/loss"]), default=0),
        "img2img": {
            k: float(np.mean([s[k] for s in scores])) if scores else None
            for k in ("psnr", "ssim", "mae")
        },
        "held_out_images": len(scores),
        "data_version": version.md5 if version else None,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, help="run folder (default_root_dir of the fit)")
    p.add_argument("--data", required=True, help="dataset folder the run trained on")
    p.add_argument("--base", required=True, help="base model (diffusers folder)")
    p.add_argument("--out", default="eval", help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.25, help="as data.val_fraction")
    p.add_argument("--max-val", type=int, default=2, help="as data.max_val")
    p.add_argument("--num-images", type=int, default=2, help="held-out photos to run img2img on")
    p.add_argument("--resolution", type=int, default=64, help="img2img size (px)")
    p.add_argument("--strength", type=float, default=0.6, help="img2img strength")
    p.add_argument("--steps", type=int, default=10, help="scheduler steps at strength 1")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image")
    p.add_argument(
        "--wandb",
        metavar="REF",
        help="also record the scores in the metadata of this W&B LoRA version "
        "(wandb://entity/project/collection:v3), where `cvgen promote` compares them",
    )
    args = p.parse_args(argv)
    metrics = evaluate(args)
    print(json.dumps(metrics, indent=2))
    if args.wandb:
        import wandb

        from cvgen.registry import record_metrics

        scores = {"val/loss": metrics["val_loss"]}
        scores |= {f"img2img/{k}": v for k, v in metrics["img2img"].items()}
        merged = record_metrics(wandb.Api(), args.wandb, scores)
        print(f"evaluate: recorded {', '.join(sorted(merged))} on {args.wandb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
