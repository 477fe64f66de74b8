"""Every Prometheus metric the server's ``/metrics`` exports, in one place.

The alert rules and the Grafana dashboard in ``deploy/monitoring/`` may only use these names
(a test parses every expression and checks), and the server's tests check that it exports each
of them, so a renamed metric cannot silently blind an alert.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One metric family as PromQL sees it.

    Args:
        name: the family name (counters include ``_total``, as exported).
        kind: ``counter``, ``gauge`` or ``histogram``.
        labels: its label names.
        help: what it measures.
    """

    name: str
    kind: str
    labels: tuple[str, ...] = ()
    help: str = ""

    def series(self) -> tuple[str, ...]:
        """The series names PromQL can select: a histogram's ``_bucket``, ``_sum``, ``_count``."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


# request path
HTTP_REQUESTS = Metric(
    "cvgen_http_requests_total",
    "counter",
    ("path", "method", "status"),
    "HTTP requests by path, method and status code",
)
HTTP_REQUEST_DURATION = Metric(
    "cvgen_http_request_duration_seconds", "histogram", ("path",), "HTTP request latency by path"
)
HTTP_IN_FLIGHT = Metric("cvgen_http_requests_in_flight", "gauge", (), "HTTP requests being handled")
QUEUE_DEPTH = Metric("cvgen_queue_depth", "gauge", (), "requests waiting for the inference worker")
# inference worker(s): by LoRA name (a batch never mixes LoRAs), by worker id
BATCH_SIZE = Metric("cvgen_batch_size", "histogram", ("lora",), "images per pipeline call")
BATCH_FILL_RATIO = Metric(
    "cvgen_batch_fill_ratio",
    "histogram",
    ("lora",),
    "batch size / max_batch_size of each pipeline call",
)
PREDICT_SECONDS = Metric(
    "cvgen_predict_seconds", "histogram", ("lora",), "wall time of one pipeline call (a batch)"
)
IMAGES = Metric("cvgen_images_total", "counter", ("lora", "keep_face"), "images generated")
STAGE_SECONDS = Metric(
    "cvgen_stage_seconds", "histogram", ("stage",), "seconds per image of detect, mask, composite"
)
WORKER_UP = Metric(
    "cvgen_worker_up", "gauge", ("worker",), "1 while the inference worker is loaded, else 0"
)
WORKER_RESTARTS = Metric(
    "cvgen_worker_restarts_total", "counter", (), "inference workers that died and were restarted"
)
WORKER_MEMORY = Metric(
    "cvgen_worker_resident_memory_bytes",
    "gauge",
    ("worker",),
    "resident memory of the inference worker",
)
WORKER_CPU = Metric(
    "cvgen_worker_cpu_seconds_total",
    "counter",
    ("worker",),
    "CPU seconds the inference worker has used (at its last batch)",
)
MODEL_INFO = Metric(
    "cvgen_model_info",
    "gauge",
    ("base", "lora", "ref", "version", "sha256"),
    "1 per served LoRA: its reference, the version it resolved to, its weights' sha256",
)
# GPU
GPU_MEMORY_ALLOCATED = Metric(
    "cvgen_gpu_memory_allocated_bytes",
    "gauge",
    ("worker",),
    "CUDA memory allocated by the worker",
)
GPU_UTILIZATION = Metric(
    "cvgen_gpu_utilization_ratio", "gauge", ("gpu",), "GPU busy share, 0 to 1 (NVML)"
)
GPU_MEMORY_USED = Metric(
    "cvgen_gpu_memory_used_bytes", "gauge", ("gpu",), "GPU memory in use (NVML)"
)
GPU_TEMPERATURE = Metric("cvgen_gpu_temperature_celsius", "gauge", ("gpu",), "GPU temperature")
# data drift (cvgen.monitor.rolling.RollingDrift)
DRIFT_SCORE = Metric(
    "cvgen_drift_score",
    "gauge",
    ("feature",),
    "KS statistic of the last requests' feature vs the training photos (0 same, 1 disjoint; "
    "NaN until enough requests)",
)
DRIFT_PHOTOS = Metric(
    "cvgen_drift_photos_total",
    "counter",
    ("outcome",),
    "photos whose drift features were measured, skipped (busy), failed, or not logged",
)
DRIFT_FEATURE_SECONDS = Metric(
    "cvgen_drift_feature_seconds", "histogram", (), "seconds to compute one photo's features"
)
# prometheus_client's process collector (the API-server process)
PROCESS_METRICS = tuple(
    Metric(name, kind, (), "prometheus_client process collector")
    for name, kind in (
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
    )
)

SERVER_METRICS: tuple[Metric, ...] = (
    HTTP_REQUESTS,
    HTTP_REQUEST_DURATION,
    HTTP_IN_FLIGHT,
    QUEUE_DEPTH,
    BATCH_SIZE,
    BATCH_FILL_RATIO,
    PREDICT_SECONDS,
    IMAGES,
    STAGE_SECONDS,
    WORKER_UP,
    WORKER_RESTARTS,
    WORKER_MEMORY,
    WORKER_CPU,
    MODEL_INFO,
    GPU_MEMORY_ALLOCATED,
    GPU_UTILIZATION,
    GPU_MEMORY_USED,
    GPU_TEMPERATURE,
    DRIFT_SCORE,
    DRIFT_PHOTOS,
    DRIFT_FEATURE_SECONDS,
    *PROCESS_METRICS,
)
# series Prometheus itself adds to every scrape target
SCRAPE_SERIES = ("up", "scrape_duration_seconds", "scrape_samples_scraped")


def known_series() -> frozenset[str]:
    """Every series name an expression may select: the server's and Prometheus' own."""
    return frozenset(s for m in SERVER_METRICS for s in m.series()) | frozenset(SCRAPE_SERIES)


def labels_of(series: str) -> frozenset[str]:
    """The label names a series of :func:`known_series` carries (``le`` on buckets)."""
    for m in SERVER_METRICS:
        if series in m.series():
            extra = ("le",) if series.endswith("_bucket") and m.kind == "histogram" else ()
            return frozenset((*m.labels, *extra))
    return frozenset()
