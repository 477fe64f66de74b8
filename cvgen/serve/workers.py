"""Inference workers that die: their requests answered, the worker restarted, nothing orphaned.

LitServe 0.2 runs the model in worker processes beside the API-server process. Its own worker
monitor (``restart_workers=True``) restarts a dead worker but cannot answer the requests that
worker held: it marks them in the main process's response buffer, while they wait in the
API-server process's (a forked copy), so they would hang forever. And a monitor thread that
outlives a graceful shutdown may start a worker after the others were stopped. So cvgen keeps
LitServe's building blocks and replaces the monitor:

- :func:`watch_workers` (main process, a thread) checks the workers every
  :data:`POLL_SECONDS`. A dead one is counted in a shared dict (``deaths:<id>``) and restarted
  (``restart_workers: true``): ``/health`` is then 503 until the new worker has loaded the
  model. With ``restart_workers: false``, a worker that cannot start, or one that dies
  :data:`MAX_UNREADY_DEATHS` times without becoming ready, the server stops with exit code 1,
  for its supervisor (Cloud Run, systemd, Kubernetes) to restart it.
- :func:`answer_orphans` (API-server process, an asyncio task) reads that dict and answers
  every request the dead worker had taken (LitServe tells which worker took a request as soon
  as it dequeues it) with a 503 ``{"detail", "field"}``, at once; requests still in the queue
  are served by the restarted worker. While no worker is ready, new requests get a 503 with
  ``Retry-After`` instead of waiting (:meth:`WorkerState.unavailable`).

The shared dict is a ``multiprocessing.Manager`` dict LitServe's manager already serves; the
same dict carries reload requests to the workers (:mod:`cvgen.serve.reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from litserve.utils import LitAPIStatus, WorkerSetupStatus
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cvgen.monitor import metric_names as names

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2
MAX_UNREADY_DEATHS = 3
RETRY_AFTER_SECONDS = 10
DEATH = "deaths:"
STOPPING = "stopping"


def death_key(worker: int) -> str:
    return f"{DEATH}{worker}"


@dataclass
class WorkerState:
    """What the API-server process knows about the workers (refreshed by :func:`answer_orphans`):
    which are ready, how often each died, and whether the server is stopping."""

    ready: dict[int, bool] = field(default_factory=dict)
    deaths: dict[int, int] = field(default_factory=dict)
    stopping: str | None = None
    known: bool = False  # False until the first refresh: then nothing is refused

    def unavailable(self) -> str | None:
        """Why a new request cannot be served now (None: it can)."""
        if self.stopping:
            return f"the server is stopping ({self.stopping}); retry on another instance"
        if self.known and self.ready and not any(self.ready.values()):
            return (
                "no inference worker is ready (one is being restarted); retry in "
                f"{RETRY_AFTER_SECONDS} s"
            )
        return None

    @property
    def restarts(self) -> int:
        return sum(self.deaths.values())


def worker_index(key: str) -> int | None:
    """LitServe's worker id from its setup-status key (``predict_0`` -> 0)."""
    tail = key.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def refresh_ready(state: WorkerState, status: dict[str, Any]) -> None:
    """Update which workers are ready from LitServe's setup statuses."""
    state.ready = {
        i: v == WorkerSetupStatus.READY
        for k, v in status.items()
        if (i := worker_index(k)) is not None
    }


def refresh(state: WorkerState, status: dict[str, Any], shared: dict[str, Any]) -> list[int]:
    """Update ``state`` from LitServe's setup statuses and the shared dict; the workers that
    died since the last refresh (none on the first: nothing was in flight before it)."""
    refresh_ready(state, status)
    deaths = {int(k[len(DEATH) :]): int(v) for k, v in shared.items() if k.startswith(DEATH)}
    died = [i for i, n in deaths.items() if state.known and n > state.deaths.get(i, 0)]
    state.deaths = deaths
    state.stopping = shared.get(STOPPING)
    state.known = True
    return died


def fail_requests(buffer: MutableMapping[str, Any], detail: str, worker: int | None = None) -> int:
    """Answer 503 ``detail`` to the waiting requests in LitServe's response ``buffer`` that
    ``worker`` took (None: all of them); returns how many."""
    n = 0
    for item in list(buffer.values()):
        if item.event.is_set() or (worker is not None and item.worker_id != worker):
            continue
        error = HTTPException(503, detail, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        item.response = (error, LitAPIStatus.ERROR)
        item.event.set()
        n += 1
    return n


async def answer_orphans(
    state: WorkerState,
    status: Any,
    shared: Any,
    buffer: MutableMapping[str, Any],
    interval: float = POLL_SECONDS,
) -> None:
    """Keep ``state`` current and answer the requests of dead workers (runs until cancelled)."""
    while True:
        try:
            status_now, shared_now = await asyncio.to_thread(lambda: (status.copy(), shared.copy()))
        except (OSError, EOFError, ConnectionError):  # the manager is gone: shutting down
            return
        for worker in refresh(state, status_now, shared_now):
            n = fail_requests(
                buffer,
                f"the inference worker {worker} died while making this image; it is being "
                f"restarted: retry in {RETRY_AFTER_SECONDS} s",
                worker,
            )
            log.error("inference worker %d died: %d request(s) in it answered 503", worker, n)
        if state.stopping:
            fail_requests(buffer, f"the server is stopping ({state.stopping})")
        await asyncio.sleep(interval)


class WorkerWatch:
    """The main process's watch over the inference workers (:func:`watch_workers`).

    Args:
        workers: LitServe's list of worker processes (replaced in place on restart).
        restart: ``(index) -> process``: start worker ``index`` again.
        status: LitServe's setup statuses (``predict_<id>`` -> starting / ready / error).
        shared: the shared dict the API-server process reads.
        restart_workers: restart a dead worker (else stop the server).
        stop_server: called (once) to stop the server when it cannot go on.
    """

    def __init__(
        self,
        workers: list[Any],
        restart: Callable[[int], Any],
        status: Any,
        shared: Any,
        restart_workers: bool,
        stop_server: Callable[[str], None],
    ) -> None:
        self.workers = workers
        self.restart = restart
        self.status = status
        self.shared = shared
        self.restart_workers = restart_workers
        self.stop_server = stop_server
        self.stopped = threading.Event()
        self.lock = threading.Lock()  # a restart never overlaps a shutdown
        self.unready_deaths: dict[int, int] = {}

    @contextlib.contextmanager
    def stopping(self) -> Iterator[None]:
        """Hold while the server shuts its workers down: no worker is restarted after."""
        with self.lock:
            self.stopped.set()
            yield

    def check(self) -> None:
        """One round: restart (or give up on) every dead worker."""
        for index, proc in enumerate(self.workers):
            if proc.is_alive():
                if self._state(index) == WorkerSetupStatus.READY:
                    self.unready_deaths[index] = 0
                continue
            with self.lock:
                if self.stopped.is_set():
                    return
                self._dead(index, proc)

    def _state(self, index: int) -> Any:
        return next(
            (v for k, v in self.status.items() if worker_index(k) == index),
            None,
        )

    def _dead(self, index: int, proc: Any) -> None:
        state = self._state(index)
        key = death_key(index)
        self.shared[key] = int(self.shared.get(key, 0)) + 1
        if state != WorkerSetupStatus.READY:
            self.unready_deaths[index] = self.unready_deaths.get(index, 0) + 1
        why = f"inference worker {index} (pid {proc.pid}) exited with code {proc.exitcode}"
        if state == WorkerSetupStatus.ERROR:
            self._give_up(f"{why} after failing to load the model")
        elif not self.restart_workers:
            self._give_up(f"{why}; restart_workers is false")
        elif self.unready_deaths.get(index, 0) >= MAX_UNREADY_DEATHS:
            self._give_up(f"{why}, {MAX_UNREADY_DEATHS} times without becoming ready")
        else:
            log.error("%s; restarting it", why)
            t0 = time.monotonic()
            self.workers[index] = self.restart(index)
            log.info(
                "inference worker %d restarted as pid %d in %.2f s (loading the model next)",
                index,
                self.workers[index].pid,
                time.monotonic() - t0,
            )

    def _give_up(self, why: str) -> None:
        log.error("%s: stopping the server (exit code 1) for its supervisor to restart it", why)
        self.stopped.set()
        with contextlib.suppress(Exception):
            self.shared[STOPPING] = why
        time.sleep(3 * POLL_SECONDS)  # the API server answers what is waiting first
        self.stop_server(why)

    def run(self) -> None:
        """Check until stopped (a daemon thread's target)."""
        while not self.stopped.is_set():
            try:
                self.check()
            except (OSError, EOFError, ConnectionError, BrokenPipeError):
                return  # the manager is gone: the server is shutting down
            except Exception:
                log.exception("worker watch failed")
            self.stopped.wait(POLL_SECONDS)


class WorkerCollector:
    """``cvgen_worker_up{worker}``, ``cvgen_worker_restarts_total`` and ``cvgen_queue_depth``
    for ``/metrics``, from the API-server process's :class:`WorkerState` and the queue."""

    def __init__(self, state: WorkerState, queue_depth: Callable[[], int | None]) -> None:
        self.state = state
        self.queue_depth = queue_depth

    def describe(self) -> list[Any]:
        return self._families()

    @staticmethod
    def _families() -> list[Any]:
        return [
            GaugeMetricFamily(names.WORKER_UP.name, names.WORKER_UP.help, labels=["worker"]),
            CounterMetricFamily(names.WORKER_RESTARTS.name, names.WORKER_RESTARTS.help),
            GaugeMetricFamily(names.QUEUE_DEPTH.name, names.QUEUE_DEPTH.help),
        ]

    def collect(self) -> list[Any]:
        up, restarts, queue = self._families()
        for worker, ready in sorted(self.state.ready.items()):
            up.add_metric([str(worker)], 1.0 if ready and not self.state.stopping else 0.0)
        restarts.add_metric([], float(self.state.restarts))
        depth = self.queue_depth()
        if depth is not None:
            queue.add_metric([], float(depth))
        return [up, restarts, queue]
