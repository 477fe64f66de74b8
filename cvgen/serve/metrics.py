"""Prometheus metrics of the server, in a registry of their own (one per server object).

HTTP metrics are counted in the API-server process by :class:`cvgen.serve.middleware.
ObserveMiddleware`. Model-side figures (batch size, predict time, worker memory) are measured in
the inference worker and travel back with each result, so one ``/metrics`` shows both without
Prometheus multiprocess mode. The server runs one API-server process, so the counters are whole.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

from cvgen.serve.schema import GenRequest, GenResult

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# paths with their own label; anything else is "other" (no unbounded label values)
KNOWN_PATHS = ("/predict", "/health", "/metrics", "/info", "/looks", "/loras", "/")
NO_LORA = "none"  # the lora label of images made without a LoRA


class ServeMetrics:
    """The server's metrics; ``render()`` gives the Prometheus text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc. of the API server
        self.requests = Counter(
            "cvgen_http_requests_total",
            "HTTP requests by path, method and status code",
            ["path", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "cvgen_http_request_duration_seconds",
            "HTTP request latency by path",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "cvgen_http_requests_in_flight", "HTTP requests being handled", registry=r
        )
        # by LoRA name (bounded: the server config's LoRAs); a batch never mixes LoRAs
        self.batch_size = Histogram(
            "cvgen_batch_size",
            "images per pipeline call, by LoRA",
            ["lora"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.predict_seconds = Histogram(
            "cvgen_predict_seconds",
            "wall time of one pipeline call (a batch), by LoRA",
            ["lora"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "cvgen_images_total",
            "images generated, by LoRA and keep_face",
            ["lora", "keep_face"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "cvgen_stage_seconds",
            "seconds per image of each stage: detect (API server), mask, composite (keep_face)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.worker_rss = Gauge(
            "cvgen_worker_resident_memory_bytes",
            "resident memory of the inference worker (at its last batch)",
            registry=r,
        )
        self.gpu_memory = Gauge(
            "cvgen_gpu_memory_allocated_bytes",
            "CUDA memory allocated by the inference worker (at its last batch; 0 on CPU)",
            registry=r,
        )

    @staticmethod
    def path_label(path: str) -> str:
        return path if path in KNOWN_PATHS else "other"

    def observe_result(self, job: GenRequest, result: GenResult) -> None:
        """Record the figures of one image: its request's (face detection) and the model-side
        ones that came back with it."""
        lora = result.params.lora or NO_LORA
        self.images.labels(lora, str(result.params.keep_face).lower()).inc()
        if result.batch_index == 0:  # once per pipeline call, not once per image
            self.batch_size.labels(lora).observe(result.batch_size)
            self.predict_seconds.labels(lora).observe(result.predict_seconds)
        for stage, seconds in {**job.timings, **result.timings}.items():
            if stage != "generate":  # per batch: cvgen_predict_seconds
                self.stage_seconds.labels(stage).observe(seconds)
        if "rss_bytes" in result.memory:
            self.worker_rss.set(result.memory["rss_bytes"])
        if "gpu_bytes" in result.memory:
            self.gpu_memory.set(result.memory["gpu_bytes"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
