"""What the server serves (``GET /info``, ``cvgen_model_info``) and changing it without a restart
(``POST /admin/reload``).

A reload resolves the configured LoRA references again (a ``wandb://...:production`` alias
that ``cvgen promote`` moved now names another version), checks each against the base model,
and, when anything changed, publishes the new set in the shared dict of
:mod:`cvgen.serve.workers` as a new *generation*. Every inference worker watches that dict
(:class:`ReloadWatch`, a thread): it loads the new LoRAs into a second engine beside the one
serving, then swaps the two between batches (a batch runs wholly on one generation) and
acknowledges. The API server waits for every ready worker's acknowledgement. A resolution
that fails (alias gone, W&B unreachable, a LoRA for another base) changes nothing; a worker
that fails to load the new set keeps the old one, and every worker is sent back to the old
set. Either way the answer says why, and the server goes on serving what it served. A worker
restarted later loads the current generation, not the one it was first started with.

Memory: for the seconds of a swap a worker holds two copies of the model (base and LoRAs).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cvgen.errors import CVGenError
from cvgen.serve.config import ServeConfig
from cvgen.serve.wandb_lora import LoraSource, resolve_sources, with_sources
from cvgen.serve.workers import DEATH, worker_index

log = logging.getLogger(__name__)
TARGET = "target"  # {"generation": n, "loras": {name: path}}
ACK = "ack:"  # ack:<worker> -> [generation, error ("" when loaded)]
NO_LORA = "none"


def target_cfg(cfg: ServeConfig, shared: Any) -> tuple[ServeConfig, int]:
    """``cfg`` with the LoRAs of the current generation in ``shared`` (as it is without one),
    and that generation (0: the start-up one)."""
    target = shared.get(TARGET) if shared is not None else None
    if not target:
        return cfg, 0
    loras = dict(target["loras"])
    return cfg.model_copy(update={"lora": None, "loras": loras}), int(target["generation"])


class ReloadWatch:
    """In an inference worker: loads each new generation and swaps it in (see the module
    docstring). ``load(cfg)`` builds an engine; ``swap(engine)`` puts it in place."""

    def __init__(
        self,
        shared: Any,
        worker: int,
        cfg: ServeConfig,
        generation: int,
        load: Callable[[ServeConfig], Any],
        swap: Callable[[Any], None],
        interval: float = 0.5,
    ) -> None:
        self.shared = shared
        self.worker = worker
        self.cfg = cfg
        self.generation = generation
        self.load = load
        self.swap = swap
        self.interval = interval

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="cvgen-reload", daemon=True)
        t.start()
        return t

    def run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                target = self.shared.get(TARGET)
            except (OSError, EOFError, ConnectionError):
                return  # the manager is gone: the server is stopping
            if target and int(target["generation"]) > self.generation:
                self.apply(int(target["generation"]), dict(target["loras"]))

    def apply(self, generation: int, loras: dict[str, str]) -> None:
        """Load ``loras`` and swap them in; acknowledge (with the error if it failed)."""
        cfg = self.cfg.model_copy(update={"lora": None, "loras": loras})
        error = ""
        t0 = time.perf_counter()
        try:
            engine = self.load(cfg)
        except Exception as e:  # keep serving the old engine, and say why
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            log.exception(
                "reload %d: loading %s failed; still serving the previous LoRAs", generation, loras
            )
        else:
            self.swap(engine)
            log.info(
                "reload %d: now serving %s (loaded in %.1f s)",
                generation,
                ", ".join(f"{k}={v}" for k, v in loras.items()) or "the base model",
                time.perf_counter() - t0,
            )
        self.generation = generation
        with contextlib.suppress(OSError, EOFError, ConnectionError):
            self.shared[f"{ACK}{self.worker}"] = [generation, error]


@dataclasses.dataclass
class Served:
    """What the server serves now: its LoRAs' sources and when they were loaded."""

    cfg: ServeConfig
    sources: dict[str, LoraSource]
    generation: int = 0
    loaded_at: float = dataclasses.field(default_factory=time.time)

    def loras(self) -> list[dict[str, Any]]:
        default = self.cfg.default_lora_name
        return [
            {**s.to_dict(), "default": name == default, "fused": self.cfg.fused}
            for name, s in self.sources.items()
        ]

    def metric_rows(self) -> list[dict[str, str]]:
        """``cvgen_model_info``'s series: one per LoRA (one ``lora="none"`` without)."""
        base = self.cfg.base
        if not self.sources:
            return [{"base": base, "lora": NO_LORA, "ref": "", "version": "", "sha256": ""}]
        return [
            {
                "base": base,
                "lora": name,
                "ref": s.ref,
                "version": s.version or "",
                "sha256": s.sha256[:16],
            }
            for name, s in self.sources.items()
        ]


def info_body(served: Served, server: dict[str, Any]) -> dict[str, Any]:
    """``GET /info``: versions, model, LoRAs, levers and workers."""
    cfg = served.cfg
    return {
        "cvgen": cvgen_version(),
        "base": cfg.base,
        "loras": served.loras(),
        "default_lora": cfg.default_lora_name,
        "generation": served.generation,
        "loaded_at": round(served.loaded_at, 3),
        "scheduler": cfg.scheduler,
        "speed_lora": (
            {"path": cfg.speed_lora, "scale": cfg.speed_lora_scale} if cfg.speed_lora else None
        ),
        "dtype": cfg.dtype,
        "resolution": cfg.image_size,
        "levers": dataclasses.asdict(cfg.levers),
        "max_batch_size": cfg.max_batch_size,
        **server,
    }


class ReloadError(Exception):
    """A reload that changed nothing: ``status`` (HTTP), ``detail`` and ``field``."""

    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field


class Reloader:
    """The API server's half of ``POST /admin/reload``.

    Args:
        source_cfg: the serve config as given (LoRA references unresolved).
        served: what is served now (updated by a successful reload).
        shared: the shared dict (:mod:`cvgen.serve.workers`).
        status: LitServe's worker setup statuses.
        timeout: seconds to wait for the workers (``reload_timeout``).
        wandb_api: the W&B API object (None: ``wandb.Api()``; tests pass a fake).
    """

    def __init__(
        self,
        source_cfg: ServeConfig,
        served: Served,
        shared: Callable[[], Any],
        status: Callable[[], Any],
        timeout: float,
        wandb_api: Any = None,
    ) -> None:
        self.source_cfg = source_cfg
        self.served = served
        self.shared = shared
        self.status = status
        self.timeout = timeout
        self.wandb_api = wandb_api
        self.lock = asyncio.Lock()
        self.on_change: Callable[[Served], None] | None = None

    async def reload(self) -> dict[str, Any]:
        """Resolve again and load what changed; the answer's body, or :class:`ReloadError`."""
        if self.lock.locked():
            raise ReloadError(409, "a reload is already running; wait for its answer")
        async with self.lock:
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        old = self.served
        try:
            sources = await asyncio.to_thread(resolve_sources, self.source_cfg, self.wandb_api)
        except CVGenError as e:
            field = str(e).split(":", 1)[0] if str(e).startswith("loras.") else "lora"
            raise ReloadError(422, f"{e}; still serving {describe(old.sources)}", field) from None
        if sources == old.sources:
            return {"reloaded": False, "detail": f"already serving {describe(sources)}"}
        shared = self.shared()
        ready = self._ready_workers()
        generation = old.generation + 1
        paths = {name: s.path for name, s in sources.items()}
        t0 = time.monotonic()
        await asyncio.to_thread(
            shared.__setitem__, TARGET, {"generation": generation, "loras": paths}
        )
        errors = await self._wait(shared, ready, generation)
        if errors:
            # back to the old set everywhere (workers that did load the new one included)
            back = {name: s.path for name, s in old.sources.items()}
            await asyncio.to_thread(
                shared.__setitem__, TARGET, {"generation": generation + 1, "loras": back}
            )
            self.served = dataclasses.replace(old, generation=generation + 1)
            status = 504 if all(e.startswith("timed out") for e in errors.values()) else 500
            why = "; ".join(f"worker {w}: {e}" for w, e in sorted(errors.items()))
            raise ReloadError(
                status,
                f"the workers could not load {describe(sources)} ({why}); still serving "
                f"{describe(old.sources)}",
            )
        self.served = Served(with_sources(self.source_cfg, sources), sources, generation)
        if self.on_change is not None:
            self.on_change(self.served)
        log.info(
            "reload %d: serving %s (was %s), %.1f s",
            generation,
            describe(sources),
            describe(old.sources),
            time.monotonic() - t0,
        )
        return {
            "reloaded": True,
            "detail": f"now serving {describe(sources)} (was {describe(old.sources)})",
            "seconds": round(time.monotonic() - t0, 2),
        }

    def _ready_workers(self) -> list[int]:
        status = self.status().copy()
        return sorted(i for k, v in status.items() if (i := worker_index(k)) is not None)

    async def _wait(self, shared: Any, workers: list[int], generation: int) -> dict[int, str]:
        """Wait for every worker's acknowledgement of ``generation``; the errors by worker (a
        worker that died meanwhile loads the new generation when restarted: not an error)."""
        deaths0 = await asyncio.to_thread(shared.copy)
        deadline = time.monotonic() + self.timeout
        while True:
            now = await asyncio.to_thread(shared.copy)
            errors, waiting = {}, []
            for w in workers:
                ack = now.get(f"{ACK}{w}")
                if ack and int(ack[0]) >= generation:
                    if ack[1]:
                        errors[w] = str(ack[1])
                elif now.get(f"{DEATH}{w}", 0) == deaths0.get(f"{DEATH}{w}", 0):
                    waiting.append(w)
            if not waiting:
                return errors
            if time.monotonic() > deadline:
                return {
                    **errors,
                    **{w: f"timed out after {self.timeout:g} s (reload_timeout)" for w in waiting},
                }
            await asyncio.sleep(0.2)


def cvgen_version() -> str:
    """The installed cvgen's version ("unknown" when not installed as a package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cvgen")
    except PackageNotFoundError:
        return "unknown"


def describe(sources: dict[str, LoraSource]) -> str:
    """``name=ref (version, sha256 prefix)`` for each LoRA, or ``the base model alone``."""
    if not sources:
        return "the base model alone"
    parts = []
    for name, s in sources.items():
        what = s.version or s.path
        parts.append(f"{name}={s.ref} ({what}, sha256 {s.sha256[:12]})")
    return ", ".join(parts)
