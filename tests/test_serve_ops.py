"""Operations of the server without a model: GPU metrics through a fake NVML, the worker watch
(dead workers: requests answered, restart, giving up), and reloads against fake workers."""

from __future__ import annotations

import asyncio
import threading
import types
from pathlib import Path
from typing import Any

import pytest
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus
from prometheus_client import CollectorRegistry, generate_latest

from cvgen.serve.config import ServeConfig
from cvgen.serve.gpu import NvmlCollector
from cvgen.serve.reload import ACK, TARGET, Reloader, ReloadError, Served
from cvgen.serve.wandb_lora import LoraSource
from cvgen.serve.workers import (
    STOPPING,
    WorkerCollector,
    WorkerState,
    WorkerWatch,
    death_key,
    fail_requests,
    refresh,
)

# --- GPU metrics (NVML) --------------------------------------------------------------------


def fake_nvml(gpus: int = 2, lost: int | None = None) -> types.SimpleNamespace:
    """A stand-in for the ``pynvml`` module: ``gpus`` GPUs, GPU ``lost`` failing every read."""

    class NVMLError(Exception):
        pass

    def check(h: int) -> int:
        if h == lost:
            raise NVMLError("GPU is lost")
        return h

    return types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: gpus,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=40 + check(h)),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(check(h) + 1) * 2**30),
        nvmlDeviceGetTemperature=lambda h, sensor: 60 + check(h),
    )


def _text(collector: Any) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_gpu_metrics_from_nvml() -> None:
    text = _text(NvmlCollector(fake_nvml(2)))
    assert 'cvgen_gpu_utilization_ratio{gpu="0"} 0.4' in text
    assert 'cvgen_gpu_utilization_ratio{gpu="1"} 0.41' in text
    assert 'cvgen_gpu_memory_used_bytes{gpu="1"} 2.147483648e+09' in text
    assert 'cvgen_gpu_temperature_celsius{gpu="0"} 60.0' in text


def test_gpu_metrics_without_nvml_are_a_no_op() -> None:
    class NoDriver:
        def nvmlInit(self) -> None:
            raise OSError("NVML Shared Library Not Found")

    assert "cvgen_gpu" not in _text(NvmlCollector(NoDriver()))


def test_a_lost_gpu_drops_its_series_not_the_scrape() -> None:
    text = _text(NvmlCollector(fake_nvml(2, lost=1)))
    assert 'gpu="0"' in text and 'gpu="1"' not in text


# --- dead workers ---------------------------------------------------------------------------


def test_the_litserve_internals_the_worker_watch_relies_on() -> None:
    """cvgen.serve.workers and .server use these LitServe 0.2 internals: a new LitServe that
    changes them fails here with a name, not with hanging requests."""
    import inspect

    import litserve as ls
    from litserve.loops.base import LitLoop

    from cvgen.serve.server import CVGenServer

    for name in (
        "_init_manager",
        "_start_worker_monitoring",
        "_perform_graceful_shutdown",
        "launch_single_inference_worker",
        "lifespan",
        "_inference_workers_config_for_api",
    ):
        assert callable(getattr(ls.LitServer, name)), name
        ours = getattr(CVGenServer, name)
        if name in CVGenServer.__dict__ and name != "_perform_graceful_shutdown":
            assert list(inspect.signature(ours).parameters) == list(
                inspect.signature(getattr(ls.LitServer, name)).parameters
            ), name
    # workers say which request they took only with restart_workers (LitAPIStatus.START)
    assert "self._restart_workers" in inspect.getsource(LitLoop.put_response)
    assert {"event", "worker_id", "response"} <= set(ResponseBufferItem.__dataclass_fields__)


def _buffer(**workers: int | None) -> dict[str, ResponseBufferItem]:
    """LitServe's response buffer with one waiting request per key, taken by that worker."""
    out = {}
    for uid, worker in workers.items():
        item = ResponseBufferItem(event=asyncio.Event())
        item.worker_id = worker
        out[uid] = item
    return out


def test_requests_of_a_dead_worker_get_503_and_the_others_wait() -> None:
    buffer = _buffer(a=0, b=1, c=None)  # c: still in the queue
    assert fail_requests(buffer, "worker 0 died", worker=0) == 1
    error, status = buffer["a"].response
    assert status == LitAPIStatus.ERROR and error.status_code == 503
    assert error.detail == "worker 0 died" and error.headers["Retry-After"]
    assert buffer["a"].event.is_set()
    assert not buffer["b"].event.is_set() and not buffer["c"].event.is_set()
    assert fail_requests(buffer, "stopping") == 2  # all that are left


def test_worker_state_sees_deaths_readiness_and_stopping() -> None:
    state = WorkerState()
    status = {"predict_0": WorkerSetupStatus.READY, "predict_1": WorkerSetupStatus.READY}
    assert refresh(state, status, {}) == [] and state.unavailable() is None
    status["predict_0"] = WorkerSetupStatus.STARTING
    assert refresh(state, status, {death_key(0): 1}) == [0]
    assert refresh(state, status, {death_key(0): 1}) == []  # reported once
    assert state.ready == {0: False, 1: True} and state.unavailable() is None  # 1 serves
    status["predict_1"] = WorkerSetupStatus.STARTING
    refresh(state, status, {death_key(0): 1})
    why = state.unavailable()
    assert why is not None and "no inference worker is ready" in why
    refresh(state, status, {death_key(0): 1, STOPPING: "worker 0 failed"})
    assert "stopping" in (state.unavailable() or "")
    text = _text(WorkerCollector(state, lambda: 3))
    assert 'cvgen_worker_up{worker="0"} 0.0' in text
    assert "cvgen_worker_restarts_total 1.0" in text and "cvgen_queue_depth 3.0" in text


class FakeProc:
    def __init__(self, pid: int, alive: bool = True) -> None:
        self.pid, self.alive, self.exitcode = pid, alive, None if alive else -9

    def is_alive(self) -> bool:
        return self.alive


def _watch(restart_workers: bool = True, status: Any = WorkerSetupStatus.READY) -> Any:
    procs = [FakeProc(100), FakeProc(101, alive=False)]
    started: list[int] = []
    stopped: list[str] = []

    def restart(i: int) -> FakeProc:
        started.append(i)
        return FakeProc(200 + i)

    statuses = {"predict_0": WorkerSetupStatus.READY, "predict_1": status}
    watch = WorkerWatch(procs, restart, statuses, {}, restart_workers, stopped.append)
    return watch, procs, started, stopped


def test_the_watch_restarts_a_dead_worker_and_counts_it() -> None:
    watch, procs, started, stopped = _watch()
    watch.check()
    assert started == [1] and procs[1].pid == 201 and stopped == []
    assert watch.shared == {death_key(1): 1}
    watch.check()
    assert started == [1]  # the new one lives


def test_the_watch_stops_the_server_when_it_cannot_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cvgen.serve.workers.time.sleep", lambda s: None)
    for kw, reason in (
        ({"restart_workers": False}, "restart_workers is false"),
        ({"status": WorkerSetupStatus.ERROR}, "after failing to load the model"),
    ):
        watch, procs, started, stopped = _watch(**kw)
        watch.check()
        assert started == [] and len(stopped) == 1 and reason in stopped[0]
        assert reason in watch.shared[STOPPING]
    # a worker that keeps dying before it is ready: given up after a few tries
    watch, procs, started, stopped = _watch(status=WorkerSetupStatus.STARTING)
    for _ in range(5):
        procs[1].alive = False
        watch.check()
    assert started == [1, 1] and len(stopped) == 1 and "3 times" in stopped[0]


def test_no_restart_after_shutdown_began() -> None:
    watch, _, started, stopped = _watch()
    with watch.stopping():
        pass
    watch.check()
    assert started == [] and stopped == []


# --- reload against fake workers ------------------------------------------------------------


def _source(name: str, version: str, path: str) -> LoraSource:
    return LoraSource(name, f"wandb://me/p/lora:{name}", path, version * 8, name, version, "d")


class FakeWorkers:
    """Workers that acknowledge every generation published in ``shared`` (with ``error``)."""

    def __init__(self, shared: dict[str, Any], workers: int, error: str = "") -> None:
        self.shared, self.workers, self.error = shared, workers, error
        self.seen: list[dict[str, Any]] = []
        self.done = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        last = 0
        while not self.done.wait(0.02):
            target = self.shared.get(TARGET)
            if target and target["generation"] > last:
                last = target["generation"]
                self.seen.append(target)
                for w in range(self.workers):
                    error = self.error if target["generation"] == 1 else ""
                    self.shared[f"{ACK}{w}"] = [last, error]


def _reloader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, versions: list[str], shared: dict[str, Any]
) -> Reloader:
    cfg = ServeConfig(lora="wandb://me/p/lora:production", reload_timeout=5)
    served = Served(cfg, {"default": _source("default", "v1", str(tmp_path / "v1"))})

    def resolve(cfg: ServeConfig, api: Any) -> dict[str, LoraSource]:
        version = versions[0]
        if version == "missing":
            raise __import__("cvgen.errors").errors.CVGenError(
                "wandb://me/p/lora:production: cannot resolve the W&B artifact: not found"
            )
        return {"default": _source("default", version, str(tmp_path / version))}

    monkeypatch.setattr("cvgen.serve.reload.resolve_sources", resolve)
    status = {"predict_0": WorkerSetupStatus.READY, "predict_1": WorkerSetupStatus.READY}
    return Reloader(cfg, served, lambda: shared, lambda: status, timeout=5)


def test_reload_loads_a_moved_alias_in_every_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared: dict[str, Any] = {}
    versions = ["v1"]
    reloader = _reloader(monkeypatch, tmp_path, versions, shared)
    same = asyncio.run(reloader.reload())
    assert same["reloaded"] is False and "already serving" in same["detail"]
    assert TARGET not in shared  # nothing sent to the workers
    workers = FakeWorkers(shared, 2)
    versions[0] = "v2"
    body = asyncio.run(reloader.reload())
    workers.done.set()
    assert body["reloaded"] is True and "v2" in body["detail"] and "was default=" in body["detail"]
    assert shared[TARGET] == {"generation": 1, "loras": {"default": str(tmp_path / "v2")}}
    assert reloader.served.sources["default"].version == "v2" and reloader.served.generation == 1
    assert reloader.served.cfg.lora_map == {"default": str(tmp_path / "v2")}


def test_a_failed_reload_keeps_serving_the_old_lora(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared: dict[str, Any] = {}
    versions = ["missing"]
    reloader = _reloader(monkeypatch, tmp_path, versions, shared)
    with pytest.raises(ReloadError) as e:
        asyncio.run(reloader.reload())
    assert e.value.status == 422 and e.value.field == "lora"
    assert "cannot resolve" in e.value.detail and "still serving default=" in e.value.detail
    assert "(v1, sha256 v1v1v1v1v1v1)" in e.value.detail and TARGET not in shared
    # a worker that cannot load the new version: everyone goes back to the old one
    workers = FakeWorkers(shared, 2, error="OutOfMemoryError: CUDA out of memory")
    versions[0] = "v2"
    with pytest.raises(ReloadError) as e:
        asyncio.run(reloader.reload())
    assert e.value.status == 500
    assert "worker 0: OutOfMemoryError: CUDA out of memory" in e.value.detail
    assert "still serving default=" in e.value.detail
    for _ in range(100):
        if len(workers.seen) == 2:
            break
        threading.Event().wait(0.02)
    workers.done.set()
    assert workers.seen[-1] == {"generation": 2, "loras": {"default": str(tmp_path / "v1")}}
    assert reloader.served.sources["default"].version == "v1"


def test_a_reload_that_workers_never_answer_times_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared: dict[str, Any] = {}
    reloader = _reloader(monkeypatch, tmp_path, ["v2"], shared)
    reloader.timeout = 0.3
    with pytest.raises(ReloadError) as e:
        asyncio.run(reloader.reload())
    assert e.value.status == 504 and "timed out after 0.3 s (reload_timeout)" in e.value.detail


# --- drift features off the request's path ---------------------------------------------------


def test_photos_beyond_what_may_wait_are_skipped_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from cvgen.serve import drift

    gate = threading.Event()
    measured: list[tuple[int, int]] = []

    def slow_features(photo: Image.Image, detector: Any) -> dict[str, float]:
        gate.wait(10)
        measured.append(photo.size)
        return {"brightness": 0.5}

    monkeypatch.setattr(drift, "photo_features", slow_features)
    monkeypatch.setattr(drift, "MAX_PENDING_PIXELS", 3 * 100 * 100)
    registry = CollectorRegistry()
    log = tmp_path / "f.jsonl"
    monitor = drift.PhotoMonitor(ServeConfig(feature_log=str(log)), registry)
    small = Image.new("RGB", (100, 100))
    assert [monitor.submit(small) for _ in range(4)] == [True, True, True, False]  # pixels
    gate.set()
    monitor.drain()
    assert len(measured) == 3 and len(log.read_text().splitlines()) == 3
    text = generate_latest(registry).decode()
    assert 'cvgen_drift_photos_total{outcome="skipped"} 1.0' in text
    assert 'cvgen_drift_photos_total{outcome="measured"} 3.0' in text
    monitor.close()
