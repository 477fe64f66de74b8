#!/usr/bin/env python
"""Serving: end-to-end HTTP latency of ``cvgen serve`` against the bare diffusers pipeline call
on the same model (the overhead ratio), throughput against concurrency and ``max_batch_size``,
and what keep_face costs per image (face detection, masks, composite) beside the generation.
With ``--lever-table``: the CPU levers instead (scripts/bench_levers.py), one image per lever
and combination against the bare fp32 diffusers pipeline: latency, speed-up, PSNR to fp32, and
end to end over HTTP for the combinations in ``--http-levers``.

The server is the real one: ``cvgen serve`` started as a subprocess on 127.0.0.1 with a
generated config, polled on ``/health``, sent a bounded number of multipart requests, then
stopped with SIGTERM. Figures go to stdout and optionally to a JSON file.

    python scripts/bench_serve.py                                  # tiny model, CPU
    python scripts/bench_serve.py --arch sd15 --device cuda --dtype bfloat16 --compile \\
        --channels-last                                            # SD 1.5 architecture, GPU
    python scripts/bench_serve.py --lever-table --arch small --resolution 256 \
        --levers bf16,dyn,bf16+compile --http-levers fp32,bf16   # CPU levers (benchmarks/README)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import machine, prepare_model

from cvgen import perf
from cvgen.accel import ServeLevers


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def photo_bytes(size: int) -> bytes:
    from PIL import Image

    from cvgen.data.sample import sample_sources
    from cvgen.images import open_image, resize_and_crop

    img = resize_and_crop(open_image(sample_sources()["hopper"]), size, size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    assert isinstance(img, Image.Image)
    return buf.getvalue()


def flags(args: argparse.Namespace) -> perf.SpeedLevers:
    """The speed levers of the benchmark's flags, for the server and the bare pipeline alike."""
    return perf.SpeedLevers(
        channels_last=args.channels_last,
        compile_unet=args.compile,
        compile_mode=args.compile_mode or "default",
    )


def bare_latency(args: argparse.Namespace, model: Path, n: int) -> list[float]:
    """Seconds per bare ``pipe(...)`` call (batch 1), the way the server calls it."""
    import torch
    from PIL import Image

    from cvgen.pipeline import load_img2img
    from cvgen.serve.config import model_resolution

    pipe = load_img2img(model, device=args.device, dtype=args.dtype)
    # the server's levers (SpeedLevers.apply, as its engine calls it): same compute on both sides
    flags(args).apply(pipe.unet, others=(pipe.vae,), cpu=args.device == "cpu")
    size = model_resolution(str(model))
    image = Image.open(io.BytesIO(photo_bytes(size))).convert("RGB")

    def call() -> None:
        pipe(
            prompt=["a professional headshot"],
            negative_prompt=[""],
            image=[image],
            strength=args.strength,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            generator=[torch.Generator().manual_seed(0)],
            output_type="pil",
        )

    for _ in range(2 if not args.compile else 3):
        call()  # warm-up (and compile)
    out = []
    for _ in range(n):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


class Server:
    """``cvgen serve`` in a subprocess (its own session), stopped with SIGTERM."""

    def __init__(
        self,
        args: argparse.Namespace,
        model: Path,
        batch: int,
        workdir: Path,
        levers: ServeLevers | None = None,
        tag: str = "",
    ):
        self.port = free_port()
        cfg = {
            "base": str(model),
            "host": "127.0.0.1",
            "port": self.port,
            "device": args.device,
            "dtype": args.dtype,
            "max_batch_size": batch,
            "batch_timeout": args.batch_timeout,
            "log_level": "warning",
            "default_steps": args.steps,
            "default_strength": args.strength,
            "levers": dataclasses.asdict(levers or ServeLevers(**dataclasses.asdict(flags(args)))),
            "resolution": getattr(args, "resolution", None),
            "warmup": True,
            "queue_timeout": 600,
        }
        name = f"serve-{batch}{'-' + tag if tag else ''}"
        path = workdir / f"{name}.yaml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        self.log = open(workdir / f"{name}.log", "w")  # noqa: SIM115
        env = {**os.environ, "CVGEN_API_KEY": ""}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cvgen.cli", "serve", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> float:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}: see {self.log.name}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout} s: see {self.log.name}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def post(
    client: Any, url: str, photo: bytes, seed: int, keep_face: bool = False
) -> tuple[float, int, dict[str, float]]:
    """Latency (s), batch size and the server's stage times (s, from Server-Timing)."""
    t0 = time.perf_counter()
    r = client.post(
        url + "/predict",
        files={"image": ("photo.jpg", photo, "image/jpeg")},
        data={"prompt": "a professional headshot", "seed": str(seed), "keep_face": str(keep_face)},
        timeout=600,
    )
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    stages = {}
    for part in r.headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            stages[name] = float(dur) / 1000
    return time.perf_counter() - t0, int(r.headers.get("x-batch-size", "1")), stages


def keep_face_stages(sizes: list[int], n: int) -> dict[str, dict[str, float]]:
    """Median seconds per image of keep_face's own work, in-process, on the sample portraits as
    uploaded: detection on the photo, then the masks and the composite at each output size."""
    from PIL import Image

    from cvgen import portrait
    from cvgen.data.sample import sample_sources
    from cvgen.images import open_image

    detector = portrait.face_detector()
    photos = [open_image(p) for p in sample_sources().values()]
    out: dict[str, dict[str, float]] = {}
    for size in sizes:
        times: dict[str, list[float]] = {"detect": [], "mask": [], "composite": []}
        for img in photos:
            for _ in range(n):
                t0 = time.perf_counter()
                faces = detector.detect(img)
                times["detect"].append(time.perf_counter() - t0)
            framed = portrait.frame_photo(img, faces, (size, size), face_fraction=0.35)
            assert framed.face is not None
            other = Image.new("RGB", (size, size), (90, 90, 90))
            for _ in range(n):
                t0 = time.perf_counter()
                keep = portrait.keep_mask((size, size), framed.face)
                portrait.repaint_mask((size, size), framed.face, 8)
                times["mask"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                portrait.composite(framed.image, other, keep)
                times["composite"].append(time.perf_counter() - t0)
        out[str(size)] = {k: statistics.median(v) for k, v in times.items()}
    return out


def keep_face_costs(url: str, photo: bytes, n: int) -> dict[str, Any]:
    """p50 latency with keep_face off and on (the same photo), and the server's median stage
    times for each (Server-Timing)."""
    import httpx

    out: dict[str, Any] = {}
    runs: dict[bool, list[tuple[float, int, dict[str, float]]]] = {False: [], True: []}
    with httpx.Client() as client:
        for keep in (False, True):
            post(client, url, photo, 0, keep)  # the first of each
        for i in range(n):  # interleaved: a load that drifts hits both alike
            for keep in (False, True):
                runs[keep].append(post(client, url, photo, i, keep))
    for keep, rs in runs.items():
        out["on" if keep else "off"] = {
            "p50_s": statistics.median(r[0] for r in rs),
            "stages_s": {k: statistics.median(r[2][k] for r in rs) for k in rs[0][2]},
        }
    return out


def throughput(url: str, photo: bytes, concurrency: int, n: int) -> dict[str, float]:
    import httpx

    with httpx.Client() as client, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda i: post(client, url, photo, i), range(n)))
        wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    return {
        "concurrency": concurrency,
        "requests": n,
        "images_per_s": n / wall,
        "p50_s": statistics.median(lat),
        "p95_s": pct(lat, 0.95),
        "mean_batch": statistics.mean(r[1] for r in results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=("tiny", "mid", "small", "sd15"), default="tiny")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--latency-requests", type=int, default=12)
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--concurrency", default="1,8", help="levels (each max_batch_size too)")
    p.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x level")
    p.add_argument("--batch-timeout", type=float, default=0.05)
    p.add_argument(
        "--keep-face-requests",
        type=int,
        default=6,
        help="requests each with keep_face off and on (max_batch_size 1 server; 0: skip)",
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--compile-mode", default=None, help="default, reduce-overhead (CUDA graphs), max-autotune"
    )
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--lever-table", action="store_true", help="the CPU lever table only")
    p.add_argument(
        "--levers",
        default="bf16,cl,compile,dyn,wo,bf16+compile+dyn,tome0.5,dc3",
        help="comma-separated combinations (scripts/bench_levers.py); fp32 always runs",
    )
    p.add_argument("--lever-rounds", type=int, default=3, help="interleaved timed rounds")
    p.add_argument(
        "--speed-lora",
        type=Path,
        default=None,
        help="the few-step LoRA of the lcm lever (default: a random rank-64 stand-in)",
    )
    p.add_argument(
        "--http-levers", default="fp32", help="combinations also timed over HTTP (paired)"
    )
    p.add_argument("--workdir", default="/tmp/cvgen-bench")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model = prepare_model(args.arch, workdir)
    from cvgen.data.sample import sample_sources
    from cvgen.serve.config import model_resolution

    photo = photo_bytes(args.resolution or model_resolution(str(model)))
    if args.lever_table:
        run_lever_table(args, model, photo, t_start)
        return

    bare = bare_latency(args, model, args.latency_requests)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "args": vars(args),
        "bare": {"p50_s": statistics.median(bare), "p95_s": pct(bare, 0.95)},
        "servers": [],
        "keep_face": {},
    }
    sizes = sorted({model_resolution(str(model)), 512})
    stages = result["keep_face"]["in_process"] = keep_face_stages(sizes, 10)
    for size, st in stages.items():
        print(
            f"keep_face work per image at {size} px (in-process): detect "
            f"{1000 * st['detect']:.1f} ms (on the photo as uploaded), mask "
            f"{1000 * st['mask']:.2f} ms, composite {1000 * st['composite']:.2f} ms",
            flush=True,
        )
    import httpx

    print(
        f"bare pipeline, batch 1: p50 {1000 * result['bare']['p50_s']:.1f} ms", flush=True
    )  # each figure is printed (and the JSON rewritten) as soon as it is measured, so a run
    # stopped by a time limit still leaves what it had
    save(args, result)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        server = Server(args, model, batch, workdir)
        try:
            ready = server.wait_ready(args.ready_timeout)
            entry: dict[str, Any] = {"max_batch_size": batch, "ready_s": ready, "levels": []}
            result["servers"].append(entry)
            print(f"max_batch_size {batch}: ready in {ready:.0f} s", flush=True)
            if batch == 1:
                with httpx.Client() as client:
                    post(client, server.url, photo, 0)
                    lat = [
                        post(client, server.url, photo, i)[0] for i in range(args.latency_requests)
                    ]
                entry["latency"] = {"p50_s": statistics.median(lat), "p95_s": pct(lat, 0.95)}
                result["overhead"] = entry["latency"]["p50_s"] / result["bare"]["p50_s"] - 1
                print(f"  HTTP p50 {1000 * entry['latency']['p50_s']:.1f} ms", flush=True)
                save(args, result)
                if args.keep_face_requests:
                    raw = sample_sources()["hopper"].read_bytes()  # a photo as uploaded
                    kf = result["keep_face"]["http"] = keep_face_costs(
                        server.url, raw, args.keep_face_requests
                    )
                    print_keep_face(kf)
                    save(args, result)
            levels = sorted({int(c) for c in args.concurrency.split(",")} | {batch})
            for c in levels:
                lv = throughput(server.url, photo, c, args.rounds * c)
                entry["levels"].append(lv)
                print(
                    f"  {c} concurrent: {lv['images_per_s']:.2f} images/s, "
                    f"mean batch {lv['mean_batch']:.2f}",
                    flush=True,
                )
                save(args, result)
        finally:
            server.stop()

    print(
        f"\ncvgen bench_serve  {result['date']}  {result['machine']}\n"
        f"arch={args.arch} device={args.device} dtype={args.dtype} steps={args.steps} "
        f"strength={args.strength} (img2img runs {int(args.steps * args.strength)} steps) "
        f"compile={args.compile} ({args.compile_mode or 'default'}) "
        f"channels_last={args.channels_last}"
    )
    b = result["bare"]
    print(
        f"bare pipeline, batch 1:  p50 {1000 * b['p50_s']:.1f} ms  p95 {1000 * b['p95_s']:.1f} ms"
    )
    first = next((s for s in result["servers"] if "latency" in s), None)
    if first:
        la = first["latency"]
        print(
            f"HTTP, max_batch_size 1: p50 {1000 * la['p50_s']:.1f} ms  p95 {1000 * la['p95_s']:.1f} "
            f"ms  overhead {100 * result['overhead']:+.1f}% of the bare call"
        )
    print(
        f"{'max_batch':>9}{'conc':>6}{'req':>5}{'img/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'batch':>7}"
    )
    for s in result["servers"]:
        for lv in s["levels"]:
            print(
                f"{s['max_batch_size']:>9}{lv['concurrency']:>6}{lv['requests']:>5}"
                f"{lv['images_per_s']:>8.2f}{1000 * lv['p50_s']:>9.0f}{1000 * lv['p95_s']:>9.0f}"
                f"{lv['mean_batch']:>7.2f}"
            )
    by = {
        (s["max_batch_size"], lv["concurrency"]): lv["images_per_s"]
        for s in result["servers"]
        for lv in s["levels"]
    }
    top = max((k for k in by if k[1] == 8), default=None)
    if (1, 8) in by and top and top[0] > 1:
        result["batching_gain"] = by[top] / by[(1, 8)]
        print(f"ratio: 8 concurrent, max_batch_size {top[0]} vs 1: {result['batching_gain']:.2f}x")
    if result["keep_face"].get("http"):
        print("keep_face (max_batch_size 1, the hopper photo as uploaded):")
        print_keep_face(result["keep_face"]["http"])
    print(f"(total {time.perf_counter() - t_start:.0f} s)")
    save(args, result)


def print_keep_face(kf: dict[str, Any]) -> None:
    for key in ("off", "on"):
        st = kf[key]["stages_s"]
        parts = ", ".join(f"{k} {1000 * v:.1f}" for k, v in st.items())
        print(
            f"  keep_face {key}: HTTP p50 {1000 * kf[key]['p50_s']:.1f} ms ({parts} ms)", flush=True
        )
    extra = kf["on"]["p50_s"] - kf["off"]["p50_s"]
    print(f"  keep_face costs {1000 * extra:+.1f} ms per image end to end", flush=True)


def run_lever_table(args: argparse.Namespace, model: Path, photo: bytes, t_start: float) -> None:
    """``--lever-table``: scripts/bench_levers.py's table, then HTTP for ``--http-levers``."""
    import bench_levers

    args.rounds = args.lever_rounds
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "args": vars(args),
    }
    http = [n for n in args.http_levers.split(",") if n]
    servers = bench_levers.start_servers(args, model, http, Server)
    try:
        urls = {name: server.url for name, server in servers.items()}
        result["lever_table"] = bench_levers.lever_table(args, model, photo, urls, post)
    finally:
        for server in servers.values():
            server.stop()
    save(args, result)
    print(
        f"\ncvgen bench_serve --lever-table  {result['date']}  {result['machine']}\n"
        f"arch={args.arch} {len(photo)} B photo, steps={args.steps} strength={args.strength}, "
        f"batch 1, {args.lever_rounds} rounds"
    )
    bench_levers.print_table(result)
    print(f"(total {time.perf_counter() - t_start:.0f} s)")


def save(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Write the figures so far to ``--json`` (atomically: a reader never sees half a file)."""
    if args.json:
        from cvgen.fsutil import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
