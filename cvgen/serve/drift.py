"""Each request's photo described for drift monitoring, in the API-server process.

For every photo that decodes (a request later refused for having no face included: those are
drift too), :class:`PhotoMonitor` computes the drift features of :mod:`cvgen.monitor.features`
on a thread of its own, off the request's path, and

- appends them to the rotating feature log (``feature_log``; numbers only: never the photo,
  the prompt, the client's address or an identifier), which ``cvgen monitor drift`` reads;
- adds them to the rolling drift score against the training data's reference profile
  (``drift_reference``), exported per feature as ``cvgen_drift_score{feature}``.

The features use their own face detector (:func:`cvgen.monitor.features.feature_detector`,
faster settings than the framing's), because the reference profile was measured with it: the
framing's detection cannot be reused without changing what ``face_count`` means. One photo
costs a few tens of milliseconds of one core; at most :data:`MAX_PENDING` photos, and
:data:`MAX_PENDING_PIXELS` pixels of them (decoded photos are large), wait; any beyond are
skipped and counted (``cvgen_drift_photos_total{outcome="skipped"}``) rather than queue without
bound behind a burst.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Histogram

from cvgen.errors import CVGenError
from cvgen.monitor import metric_names as names
from cvgen.monitor.featurelog import FeatureLog
from cvgen.monitor.features import feature_detector, photo_features
from cvgen.monitor.profile import ReferenceProfile
from cvgen.monitor.rolling import RollingDrift
from cvgen.serve.config import ServeConfig

log = logging.getLogger(__name__)
MAX_PENDING = 32
MAX_PENDING_PIXELS = 50_000_000  # about 150 MB of RGB photos waiting, at most
FEATURE_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5)


def load_reference(cfg: ServeConfig) -> ReferenceProfile | None:
    """The reference profile ``drift_reference`` names (None: not set); a one-line
    :class:`CVGenError` naming the key for a missing or broken file."""
    if cfg.drift_reference is None:
        return None
    try:
        return ReferenceProfile.load(cfg.drift_reference)
    except CVGenError as e:
        raise CVGenError(f"drift_reference: {e}") from None


class PhotoMonitor:
    """Drift features of request photos: logged and scored, on a thread of their own.

    Args:
        cfg: the serve config (``feature_log``, ``drift_reference``, ``drift_window``, ...).
        registry: where its metrics (and the drift score collector) are registered.
        profile: the reference profile (default: loaded from ``drift_reference``).
    """

    def __init__(
        self,
        cfg: ServeConfig,
        registry: CollectorRegistry,
        profile: ReferenceProfile | None = None,
    ) -> None:
        profile = profile or load_reference(cfg)
        cascade = profile.extractor.get("cascade") if profile is not None else None
        self.detector = feature_detector(str(cascade) if cascade else None)
        self.log = FeatureLog(
            Path(cfg.feature_log or "features.jsonl"),
            max_bytes=cfg.feature_log_max_bytes,
            enabled=cfg.feature_log is not None,
        )
        self.rolling = (
            RollingDrift(profile, window=cfg.drift_window, min_samples=cfg.drift_min_samples)
            if profile is not None
            else None
        )
        if self.rolling is not None:
            registry.register(self.rolling.collector())
        self.photos = Counter(
            names.DRIFT_PHOTOS.name, names.DRIFT_PHOTOS.help, ["outcome"], registry=registry
        )
        for outcome in ("measured", "skipped", "failed", "unlogged"):
            self.photos.labels(outcome)  # every series from the start, at 0
        self.seconds = Histogram(
            names.DRIFT_FEATURE_SECONDS.name,
            names.DRIFT_FEATURE_SECONDS.help,
            buckets=FEATURE_BUCKETS,
            registry=registry,
        )
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cvgen-drift")
        self._pending = 0
        self._pending_pixels = 0
        self._lock = threading.Lock()

    def submit(self, photo: Image.Image) -> bool:
        """Measure ``photo`` (decoded, as sent) soon; False if skipped (too many waiting)."""
        pixels = photo.width * photo.height
        with self._lock:
            busy = self._pending >= MAX_PENDING or (
                self._pending and self._pending_pixels + pixels > MAX_PENDING_PIXELS
            )
            if busy:
                self.photos.labels("skipped").inc()
                return False
            self._pending += 1
            self._pending_pixels += pixels
        self._pool.submit(self._measure, photo)
        return True

    def _measure(self, photo: Image.Image) -> None:
        try:
            t0 = time.perf_counter()
            features = photo_features(photo, self.detector)
            self.seconds.observe(time.perf_counter() - t0)
            self.photos.labels("measured").inc()
            if self.log.enabled and not self.log.write(features):
                self.photos.labels("unlogged").inc()
            if self.rolling is not None:
                self.rolling.add(features)
        except Exception:  # never let a photo's features break serving
            self.photos.labels("failed").inc()
            log.exception("drift features failed for one photo")
        finally:
            with self._lock:
                self._pending -= 1
                self._pending_pixels -= photo.width * photo.height

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until the photos submitted so far are measured (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending == 0:
                    return
            time.sleep(0.01)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
