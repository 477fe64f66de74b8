"""Aspect-ratio buckets: every image trains at a size close to its own aspect ratio.

A bucket is a (width, height) pair whose sides are multiples of ``step`` and whose area is at
most ``resolution ** 2``; each image goes to the bucket whose aspect ratio is nearest to its
own in log space, and is scaled to cover that size and cropped (never stretched).
"""

from __future__ import annotations

import math


def make_buckets(
    resolution: int, step: int = 64, min_aspect: float = 0.5, max_aspect: float = 2.0
) -> list[tuple[int, int]]:
    """All (width, height) buckets for ``resolution``, sorted by aspect ratio (w / h)."""
    if resolution <= 0 or step <= 0 or resolution % step:
        raise ValueError(f"resolution {resolution} must be a positive multiple of step {step}")
    if not 0 < min_aspect <= 1 <= max_aspect:
        raise ValueError("need 0 < min_aspect <= 1 <= max_aspect")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    w = step
    while w <= area // step:
        h = (area // w) // step * step
        if h >= step and min_aspect <= w / h <= max_aspect:
            buckets.add((w, h))
        w += step
    return sorted(buckets, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log space) to ``width/height``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"bad image size {width}x{height}")
    target = math.log(width / height)
    return min(
        range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target)
    )
