"""A drift score per feature over the last requests, cheap enough for every ``/metrics`` scrape.

:class:`RollingDrift` keeps the features of the last ``window`` requests and scores each
feature with the two-sample Kolmogorov-Smirnov statistic against the reference profile: the
largest gap between the two empirical distribution functions. 0 means the same distribution,
1 means no overlap at all; it needs no binning, works for counts (``face_count``) as for
continuous values, and is bounded, so one alert threshold fits every feature
(:data:`ALERT_THRESHOLD`). The full statistical test, with p-values and an HTML report, is
``cvgen monitor drift``; this is the early warning that fires without running it.

Large references are kept as :data:`MAX_REFERENCE_POINTS` evenly spaced order statistics (the
distribution function is then exact to 1 / that many), so a score costs well under a
millisecond per feature whatever the size of the training set. Adding a request costs a few
microseconds; scores are computed when asked for (at scrape time).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping

import numpy as np
from prometheus_client.metrics_core import Metric

from cvgen.monitor.features import FEATURE_NAMES
from cvgen.monitor.metric_names import DRIFT_SCORE
from cvgen.monitor.profile import ReferenceProfile

# a feature whose score stays above this (for the alert's `for:` time) has drifted: a KS
# statistic of 0.3 from 50 requests against a reference of 500 photos has p < 0.001
ALERT_THRESHOLD = 0.3
MAX_REFERENCE_POINTS = 2000


def ks_statistic(reference_sorted: np.ndarray, sample: np.ndarray) -> float:
    """Two-sample KS statistic (as ``scipy.stats.ks_2samp``) of a sorted reference and a sample."""
    s = np.sort(sample)
    points = np.concatenate([reference_sorted, s])
    cdf_ref = np.searchsorted(reference_sorted, points, side="right") / reference_sorted.size
    cdf_cur = np.searchsorted(s, points, side="right") / s.size
    return float(np.max(np.abs(cdf_ref - cdf_cur)))


def _compress(values: np.ndarray, points: int) -> np.ndarray:
    """Sorted ``values``, or ``points`` evenly spaced order statistics of them when more."""
    v = np.sort(values)
    if v.size <= points:
        return v
    ranks = ((np.arange(points) + 0.5) * v.size / points).astype(np.int64)
    return v[ranks]


class RollingDrift:
    """Per-feature drift score of the last ``window`` requests against ``reference``.

    Args:
        reference: the training photos' profile (:class:`ReferenceProfile`).
        window: requests kept (the newest replace the oldest).
        min_samples: below this many values of a feature in the window its score is NaN (a
            handful of requests after a restart says nothing; a NaN gauge never fires an alert).
        features: the features to score (default: all).

    Thread-safe: the server may :meth:`add` from request handlers and read :meth:`scores`
    from the ``/metrics`` handler at the same time.
    """

    def __init__(
        self,
        reference: ReferenceProfile,
        window: int = 500,
        min_samples: int = 50,
        features: tuple[str, ...] = FEATURE_NAMES,
    ) -> None:
        if window < 1 or min_samples < 1:
            raise ValueError("window and min_samples must be at least 1")
        unknown = set(features) - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; known: {FEATURE_NAMES}")
        self.window = window
        self.min_samples = min(min_samples, window)
        self.features = tuple(features)
        self._ref = {f: _compress(reference.values(f), MAX_REFERENCE_POINTS) for f in features}
        self._buf = np.full((window, len(features)), np.nan)
        self._next = 0  # where the next request goes (a ring)
        self._count = 0  # requests held (<= window)
        self.seen = 0  # requests added in all
        self._lock = threading.Lock()

    def add(self, features: Mapping[str, float | None]) -> None:
        """Take one request's features (missing or ``None`` values count as missing)."""
        row = [math.nan if (v := features.get(f)) is None else float(v) for f in self.features]
        with self._lock:
            self._buf[self._next] = row
            self._next = (self._next + 1) % self.window
            self._count = min(self._count + 1, self.window)
            self.seen += 1

    def __len__(self) -> int:
        return self._count

    def scores(self) -> dict[str, float]:
        """KS statistic per feature (0 to 1); NaN with fewer than ``min_samples`` values in the
        window, or where the reference has no value of the feature."""
        with self._lock:
            held = self._buf[: self._count].copy()
        out: dict[str, float] = {}
        for j, f in enumerate(self.features):
            col = held[:, j]
            col = col[np.isfinite(col)]
            ref = self._ref[f]
            if col.size < self.min_samples or ref.size == 0:
                out[f] = math.nan
            else:
                out[f] = ks_statistic(ref, col)
        return out

    def collector(self, name: str = DRIFT_SCORE.name) -> DriftCollector:
        """A ``prometheus_client`` collector exporting :meth:`scores` as gauge ``name{feature}``
        at each scrape (``registry.register(rolling.collector())``)."""
        return DriftCollector(self, name)


class DriftCollector:
    """Exports a :class:`RollingDrift`'s scores as one gauge per feature, computed at scrape time."""

    def __init__(self, rolling: RollingDrift, name: str) -> None:
        self.rolling = rolling
        self.name = name

    def describe(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(self.name, DRIFT_SCORE.help, labels=["feature"])

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily(self.name, DRIFT_SCORE.help, labels=["feature"])
        for feature, score in self.rolling.scores().items():
            g.add_metric([feature], score)
        yield g
