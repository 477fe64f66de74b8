"""Prometheus metrics of the server, in a registry of their own (one per server object).

HTTP metrics are counted in the API-server process by :class:`cvgen.serve.middleware.
ObserveMiddleware`. Model-side figures (batch size and fill, predict time, worker memory and
CPU) are measured in the inference workers and travel back with each result, so one
``/metrics`` shows both without Prometheus multiprocess mode. The server runs one API-server
process, so the counters are whole. What is read at scrape time (queue depth, workers up and
restarted, GPUs through NVML, drift scores) comes from collectors registered beside these
(:mod:`cvgen.serve.workers`, :mod:`cvgen.serve.gpu`, :mod:`cvgen.serve.drift`). The names
are :mod:`cvgen.monitor.metric_names`'.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector

from cvgen.monitor import metric_names as names
from cvgen.serve.schema import GenRequest, GenResult

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
# paths with their own label; anything else is "other" (no unbounded label values)
KNOWN_PATHS = (
    "/predict",
    "/health",
    "/metrics",
    "/info",
    "/looks",
    "/loras",
    "/admin/reload",
    "/",
    "/docs",
    "/openapi.json",
)
NO_LORA = "none"  # the lora label of images made without a LoRA


class ServeMetrics:
    """The server's metrics; ``render()`` gives the Prometheus text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int = 1) -> None:
        self.max_batch_size = max_batch_size
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
        self.batch_fill = Histogram(
            names.BATCH_FILL_RATIO.name,
            names.BATCH_FILL_RATIO.help,
            ["lora"],
            buckets=FILL_BUCKETS,
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
            names.WORKER_MEMORY.name,
            "resident memory of the inference worker (at its last batch)",
            ["worker"],
            registry=r,
        )
        self.worker_cpu = Gauge(  # exported as a counter: see _WorkerCpu
            "cvgen_worker_cpu_seconds",
            names.WORKER_CPU.help,
            ["worker"],
            registry=None,
        )
        r.register(_WorkerCpu(self.worker_cpu))
        self.gpu_memory = Gauge(
            names.GPU_MEMORY_ALLOCATED.name,
            "CUDA memory allocated by the inference worker (at its last batch; 0 on CPU)",
            ["worker"],
            registry=r,
        )
        self.model_info = Gauge(
            names.MODEL_INFO.name, names.MODEL_INFO.help, list(names.MODEL_INFO.labels), registry=r
        )

    def set_model_info(self, rows: Iterable[dict[str, str]]) -> None:
        """``cvgen_model_info`` as ``rows`` (label -> value) say, replacing what it said."""
        self.model_info.clear()
        for row in rows:
            self.model_info.labels(**row).set(1)

    @staticmethod
    def path_label(path: str) -> str:
        if path.startswith("/static/"):
            return "/static"  # the page's files: one label, not one per file
        return path if path in KNOWN_PATHS else "other"

    def observe_result(self, job: GenRequest, result: GenResult) -> None:
        """Record the figures of one image: its request's (face detection) and the model-side
        ones that came back with it."""
        lora = result.params.lora or NO_LORA
        self.images.labels(lora, str(result.params.keep_face).lower()).inc()
        worker = str(result.worker)
        if result.batch_index == 0:  # once per pipeline call, not once per image
            self.batch_size.labels(lora).observe(result.batch_size)
            self.batch_fill.labels(lora).observe(result.batch_size / self.max_batch_size)
            self.predict_seconds.labels(lora).observe(result.predict_seconds)
            self.worker_cpu.labels(worker).set(result.cpu_seconds)
        for stage, seconds in {**job.timings, **result.timings}.items():
            if stage != "generate":  # per batch: cvgen_predict_seconds
                self.stage_seconds.labels(stage).observe(seconds)
        if "rss_bytes" in result.memory:
            self.worker_rss.labels(worker).set(result.memory["rss_bytes"])
        self.gpu_memory.labels(worker).set(result.memory.get("gpu_bytes", 0))  # 0 on CPU

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCpu:
    """``cvgen_worker_cpu_seconds_total``: each worker's CPU time as reported with its last
    batch, exposed as the counter it is (it restarts from 0 with a restarted worker, which
    ``rate()`` takes as a counter reset)."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge

    def describe(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily

        return [
            CounterMetricFamily(names.WORKER_CPU.name, names.WORKER_CPU.help, labels=["worker"])
        ]

    def collect(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            names.WORKER_CPU.name, names.WORKER_CPU.help, labels=["worker"]
        )
        for metric in self.gauge.collect():
            for sample in metric.samples:
                family.add_metric([sample.labels["worker"]], sample.value)
        return [family]
