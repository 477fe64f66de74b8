#!/usr/bin/env python
"""Drift monitoring: what each request costs the server, and what a drift report costs.

Per photo (the sample portraits at each --sides, and a 12 MP phone-sized photo): the drift
features split into tone (brightness, contrast, colourfulness, sharpness) and face detection
(the drift features' detector settings, and prepare's for comparison). Per request: one
FeatureLog line and one RollingDrift.add; per scrape: RollingDrift.scores. One thread, the
median of --repeat runs after a warm-up.

    python scripts/bench_monitor.py --json benchmarks/monitor-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import machine


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sides", default="512,1024", help="photo widths to time (px)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args()

    import cv2
    import numpy as np
    from PIL import Image

    from cvgen.data.sample import sample_sources
    from cvgen.faces import FaceDetector
    from cvgen.images import open_image
    from cvgen.monitor.featurelog import FeatureLog
    from cvgen.monitor.features import feature_detector, photo_features, tone_features
    from cvgen.monitor.profile import profile_from_rows
    from cvgen.monitor.rolling import RollingDrift

    cv2.setNumThreads(1)
    monitor, prepare = feature_detector(), FaceDetector()
    photos = {name: open_image(path) for name, path in sample_sources().items()}
    out: dict[str, Any] = {"machine": machine(), "repeat": args.repeat, "photos": {}}
    cases = [(n, int(s)) for n in photos for s in args.sides.split(",")]
    cases.append(("hopper", 3024))  # a 12 MP phone photo (3024 x 3543)
    for name, side in cases:
        img = photos[name]
        img = img.resize((side, round(side * img.height / img.width)), Image.Resampling.LANCZOS)
        row = {
            "size": f"{img.width}x{img.height}",
            "tone_ms": median_ms(partial(tone_features, img), args.repeat),
            "faces_ms": median_ms(partial(monitor.detect, img), args.repeat),
            "faces_prepare_settings_ms": median_ms(partial(prepare.detect, img), args.repeat),
            "total_ms": median_ms(partial(photo_features, img, monitor), args.repeat),
        }
        out["photos"][f"{name}@{side}"] = row
        print(
            f"{name:8s} {row['size']:>10s}: features {row['total_ms']:6.1f} ms "
            f"(tone {row['tone_ms']:5.1f}, faces {row['faces_ms']:5.1f}; "
            f"faces at prepare's settings {row['faces_prepare_settings_ms']:5.1f})"
        )

    rng = np.random.default_rng(0)
    feats = photo_features(photos["hopper"], monitor)
    ref = profile_from_rows(
        (f"{i}", {k: v * rng.uniform(0.8, 1.2) for k, v in feats.items()}) for i in range(5000)
    )
    rolling = RollingDrift(ref, window=500)
    for _ in range(500):
        rolling.add(feats)
    with tempfile.TemporaryDirectory() as tmp:
        log = FeatureLog(Path(tmp) / "features.jsonl", max_bytes=1 << 20)
        out["per_request_us"] = {
            "feature_log_write": median_ms(lambda: log.write(feats), 200) * 1000,
            "rolling_add": median_ms(lambda: rolling.add(feats), 200) * 1000,
        }
    out["per_scrape_ms"] = {"rolling_scores_window500_ref5000": median_ms(rolling.scores, 50)}
    print(
        f"per request: log line {out['per_request_us']['feature_log_write']:.0f} us, "
        f"rolling add {out['per_request_us']['rolling_add']:.0f} us; "
        f"per scrape: scores {out['per_scrape_ms']['rolling_scores_window500_ref5000']:.2f} ms "
        "(window 500, reference 5000 photos)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
