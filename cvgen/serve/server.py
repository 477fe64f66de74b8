"""Build the LitServer: the img2img LitAPI, a validating ``/predict``, ``/metrics``, one JSON
shape for every error, and the metrics + access-log middleware.

LitServe does the rest: its request queue, dynamic batching and queue timeout (504) behind
``/predict``, its body limit (``max_payload_size``, 413), ``/health`` and graceful shutdown.

``/predict`` is LitServe's own request handler behind a route of ours that first validates the
request in the API-server process: LitServe fails a whole batch when any request in it raises,
and it offers no hook that runs before a request is queued, so only valid requests may enter
the queue. The route LitServe registers for the API path is replaced by that one
(:meth:`CVGenServer._register_api_endpoints`, LitServe 0.2.x internals; a test checks them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import litserve as ls
from fastapi import Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from litserve.server import RegularRequestHandler
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cvgen.images import jpeg_bytes
from cvgen.serve.api import Img2ImgAPI
from cvgen.serve.config import ServeConfig
from cvgen.serve.drift import PhotoMonitor
from cvgen.serve.gpu import NvmlCollector
from cvgen.serve.ingress import Ingress, answer_format
from cvgen.serve.looks import look_list
from cvgen.serve.metrics import ServeMetrics
from cvgen.serve.middleware import ObserveMiddleware
from cvgen.serve.openapi import predict_openapi
from cvgen.serve.page import install_page
from cvgen.serve.reload import Reloader, ReloadError, Served, info_body
from cvgen.serve.schema import ClientError, GenRequest, GenResult
from cvgen.serve.wandb_lora import LoraSource
from cvgen.serve.workers import (
    RETRY_AFTER_SECONDS,
    WorkerCollector,
    WorkerState,
    WorkerWatch,
    answer_orphans,
    refresh_ready,
)

log = logging.getLogger(__name__)
Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]


def result_response(job: GenRequest, result: GenResult, fmt: str, quality: int) -> Response:
    """The HTTP answer for one generated image in ``fmt`` (:func:`answer_format`): JPEG or PNG
    bytes, or JSON with the JPEG in base64.

    Headers: ``X-Seed``, ``X-Parameters`` (without the prompts), ``X-Batch-Size``,
    ``X-Face-Box`` (``x,y,w,h`` in the answer's pixels: the face framing centred on and
    keep_face kept; absent without a face), ``X-Faces-Found`` and ``Server-Timing`` (ms per
    stage: detect, mask, generate, composite)."""
    params = result.params.public()
    face = job.face
    timings = {**job.timings, **result.timings}
    headers = {
        "X-Seed": str(params["seed"]),
        "X-Parameters": json.dumps(params, separators=(",", ":")),
        "X-Batch-Size": str(result.batch_size),
        "X-Faces-Found": str(job.faces_found),
        "Server-Timing": ", ".join(f"{k};dur={1000 * v:.1f}" for k, v in timings.items()),
    }
    if face is not None:
        headers["X-Face-Box"] = f"{face.x},{face.y},{face.w},{face.h}"
    if fmt == "png":
        buf = io.BytesIO()
        result.image.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers=headers)
    jpeg = jpeg_bytes(result.image, quality=quality)
    if fmt == "json":
        body = {
            "image_b64": base64.b64encode(jpeg).decode("ascii"),
            "media_type": "image/jpeg",
            "width": result.image.width,
            "height": result.image.height,
            "seed": params["seed"],
            "parameters": params,
            "face_box": dataclasses.asdict(face) if face is not None else None,
            "faces_found": job.faces_found,
        }
        return JSONResponse(body, headers=headers)
    return Response(jpeg, media_type="image/jpeg", headers=headers)


class CVGenServer(ls.LitServer):
    """A LitServer whose ``/predict`` validates before queueing (see the module docstring),
    with the operations routes and duties of :mod:`cvgen.serve.workers` (dead workers),
    :mod:`cvgen.serve.reload` (``GET /info``, ``POST /admin/reload``) and
    :mod:`cvgen.serve.drift` (drift features of every photo)."""

    def __init__(
        self,
        lit_api: Img2ImgAPI,
        ingress: Ingress,
        metrics: ServeMetrics,
        reloader: Reloader,
        photos: PhotoMonitor | None = None,
        **kw: Any,
    ):
        self.ingress = ingress
        self.metrics = metrics
        self.reloader = reloader
        self.photos = photos
        self.worker_state = WorkerState()
        self.shared: Any = None  # a manager dict, made with LitServe's manager (_init_manager)
        self.exit_code = 0
        self._watch: WorkerWatch | None = None
        super().__init__(lit_api, **kw)
        self._api = lit_api
        if photos is not None:
            ingress.on_photo = photos.submit
        metrics.registry.register(WorkerCollector(self.worker_state, self._queue_depth))
        metrics.registry.register(NvmlCollector())
        metrics.set_model_info(reloader.served.metric_rows())
        reloader.on_change = self._served_changed
        auth = [Depends(self.setup_auth(lit_api))]
        self.app.add_api_route(
            "/metrics",
            self._metrics_endpoint,
            methods=["GET"],
            dependencies=auth,
            include_in_schema=False,
        )
        looks = look_list(ingress.looks)
        self._loras = lora_list(ingress.cfg)

        async def list_looks() -> JSONResponse:
            """The looks a request may name in ``look``: name, description and settings."""
            return JSONResponse({"looks": looks})

        async def list_loras() -> JSONResponse:
            """The LoRAs a request may name in ``lora``: name, whether it is the default, its
            scale, and what it was trained on (``cvgen_lora.json``; {} for a LoRA from
            elsewhere)."""
            return JSONResponse({"loras": self._loras})

        self.app.add_api_route("/looks", list_looks, methods=["GET"], dependencies=auth)
        self.app.add_api_route("/loras", list_loras, methods=["GET"], dependencies=auth)
        # LitServe's own GET /info (its settings) gives way to cvgen's (what is served)
        self.app.router.routes[:] = [
            r for r in self.app.router.routes if getattr(r, "path", None) != self.info_path
        ]
        self.app.add_api_route("/info", self._info, methods=["GET"], dependencies=auth)
        self.app.add_api_route("/admin/reload", self._reload, methods=["POST"], dependencies=auth)
        self.app.add_exception_handler(HTTPException, self._http_error)
        install_page(self.app, ingress.cfg, secured=lit_api.secured)

    # --- operations: /metrics, /info, /admin/reload ---
    async def _metrics_endpoint(self) -> Response:
        body = await run_in_threadpool(self.metrics.render)  # queue depth: a manager call
        return Response(body, media_type=self.metrics.content_type)

    async def _info(self) -> JSONResponse:
        """What this server serves: cvgen's version, the base model, each LoRA with the
        reference it came from and what that resolved to (W&B version and digest, sha256 of
        the weights), the speed levers and the workers."""
        return JSONResponse(await self.info())

    async def info(self) -> dict[str, Any]:
        """The body of ``GET /info`` (the workers' readiness as of now)."""
        state = self.worker_state
        status = self.workers_setup_status
        if hasattr(status, "copy"):
            refresh_ready(state, await asyncio.to_thread(status.copy))
        workers = {
            "accelerator": self._connector.accelerator,
            "devices": list(self.devices),
            "workers_per_device": self.workers_per_device,
            "workers": len(self._inference_workers_config_for_api(self._api.api_path)),
            "ready": sum(state.ready.values()),
            "restarts": state.restarts,
        }
        return info_body(self.reloader.served, workers)

    async def _reload(self, request: Request) -> JSONResponse:
        """Resolve the LoRA references again (aliases included) and serve what they name now,
        without a restart; needs the API key (a server without one refuses)."""
        if self._api._api_key is None:
            return JSONResponse(
                {
                    "detail": "reloading needs an API key: start the server with the variable "
                    f"{self.ingress.cfg.api_key_env} set",
                    "field": None,
                },
                status_code=403,
            )
        try:
            body = await self.reloader.reload()
        except ReloadError as e:
            return JSONResponse({"detail": e.detail, "field": e.field}, status_code=e.status)
        body["info"] = await self.info()
        return JSONResponse(body)

    def _served_changed(self, served: Served) -> None:
        self.metrics.set_model_info(served.metric_rows())
        self._loras = lora_list(served.cfg)

    def _queue_depth(self) -> int | None:
        queue = self.litapi_request_queues.get(self._api.api_path)
        if queue is None:
            return None
        try:
            return int(queue.qsize())
        except (OSError, EOFError, NotImplementedError):
            return None

    # --- inference workers: watched and restarted (cvgen.serve.workers) ---
    def _init_manager(self, num_api_servers: int) -> Any:
        manager = super()._init_manager(num_api_servers)
        self.shared = manager.dict()
        self._api.shared = self.shared  # pickled into each worker with the LitAPI
        return manager

    def _start_worker_monitoring(self, manager: Any, uvicorn_workers: dict[Any, Any]) -> None:
        """cvgen's worker watch instead of LitServe's (see :mod:`cvgen.serve.workers`)."""
        self._watch = WorkerWatch(
            self.inference_workers,
            lambda i: self.launch_single_inference_worker(self._api, i),
            self.workers_setup_status,
            self.shared,
            self.ingress.cfg.restart_workers,
            self._stop,
        )
        threading.Thread(target=self._watch.run, name="cvgen-worker-watch", daemon=True).start()

    def _stop(self, why: str) -> None:
        self.exit_code = 1
        self._shutdown_event.set()  # LitServer.run's wait returns: graceful shutdown

    def _perform_graceful_shutdown(self, *args: Any, **kw: Any) -> None:
        watch = self._watch
        with watch.stopping() if watch is not None else contextlib.nullcontext():
            super()._perform_graceful_shutdown(*args, **kw)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """LitServe's, plus the task that answers the requests of dead workers."""
        async with super().lifespan(app):
            task = None
            if self.shared is not None:
                task = asyncio.create_task(
                    answer_orphans(
                        self.worker_state,
                        self.workers_setup_status,
                        self.shared,
                        self.response_buffer,
                    )
                )
            try:
                yield
            finally:
                if task is not None:
                    task.cancel()
                if self.photos is not None:
                    self.photos.close()

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        """401, 404, 405, 413, 504, ...: the body every error has, ``{"detail", "field"}``."""
        assert isinstance(exc, HTTPException)
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        detail = str(exc.detail)
        if exc.status_code == 413 and self.max_payload_size is not None:
            detail = f"the body is larger than {self.max_payload_size} bytes"
        return JSONResponse(
            {"detail": detail, "field": None}, status_code=exc.status_code, headers=exc.headers
        )

    def _register_api_endpoints(self, lit_api: ls.LitAPI, request_type: Any, response_type: Any):
        """LitServe's registration, then its ``POST`` route for the API path swapped for the
        validating one, with the same dependencies (auth)."""
        super()._register_api_endpoints(lit_api, request_type, response_type)
        theirs = [
            r
            for r in self.app.router.routes
            if isinstance(r, APIRoute)
            and r.path == lit_api.api_path
            and "POST" in (r.methods or ())
        ]
        if len(theirs) != 1:
            raise RuntimeError(
                f"litserve {ls.__version__}: expected LitServer to register one POST "
                f"{lit_api.api_path} route, found {len(theirs)}; cvgen's validating route "
                "(cvgen/serve/server.py) needs updating for this version"
            )
        self.app.router.routes.remove(theirs[0])
        self.app.add_api_route(
            lit_api.api_path,
            self.validating_endpoint(lit_api),
            methods=["POST"],
            dependencies=list(theirs[0].dependencies),
            response_model=None,
            openapi_extra=predict_openapi(self.ingress.cfg, self.ingress.looks),
        )

    def validating_endpoint(self, lit_api: ls.LitAPI) -> Endpoint:
        """``POST /predict``: validate (4xx naming the field), then queue the
        :class:`GenRequest` through LitServe's own handler and answer its :class:`GenResult`."""
        handler = RegularRequestHandler(lit_api, self)
        ingress, metrics, workers = self.ingress, self.metrics, self.worker_state

        async def predict(request: Request) -> Response:
            state = request.scope.setdefault("state", {})
            try:
                job = await ingress.parse(request, state.get("request_id", ""))
            except ClientError as e:
                state["error_field"] = e.field
                return JSONResponse(e.body(), status_code=e.status)
            why = workers.unavailable()
            if why is not None and not workers.stopping:  # the state is a poll old: look now
                status = await asyncio.to_thread(self.workers_setup_status.copy)
                refresh_ready(workers, status)
                why = workers.unavailable()
            if why is not None:  # a dead worker is being restarted: no waiting in the dark
                return JSONResponse(
                    {"detail": why, "field": None},
                    status_code=503,
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            # request_type other than Request: LitServe queues the object as it is
            result = await handler.handle_request(job, GenRequest)
            metrics.observe_result(job, result)
            state["batch_size"] = result.batch_size
            return await run_in_threadpool(
                result_response, job, result, answer_format(request), ingress.cfg.jpeg_quality
            )

        return predict


def lora_list(cfg: ServeConfig) -> list[dict[str, Any]]:
    """What ``GET /loras`` answers: each LoRA's name, whether it is the default, its scale
    (fixed where fused) and its ``cvgen_lora.json`` (what it was trained on)."""
    from cvgen.lora import read_lora_info

    return [
        {
            "name": name,
            "default": name == cfg.default_lora_name,
            "scale": cfg.lora_scale,
            "fused": cfg.fused,
            "trained": read_lora_info(path),
        }
        for name, path in cfg.lora_map.items()
    ]


def build_server(
    cfg: ServeConfig,
    api_key: str | None = None,
    source_cfg: ServeConfig | None = None,
    sources: dict[str, LoraSource] | None = None,
    wandb_api: Any = None,
) -> CVGenServer:
    """The LitServer for ``cfg``; its LoRAs must already be local paths (see
    :func:`cvgen.serve.wandb_lora.resolve_sources`). ``api_key`` None disables auth.

    ``source_cfg`` is the config as given (``wandb://`` references unresolved: what
    ``POST /admin/reload`` resolves again; default ``cfg``), ``sources`` what its LoRAs resolved
    to (default: worked out from ``cfg``'s paths), ``wandb_api`` the W&B API of reloads (None:
    ``wandb.Api()``)."""
    from cvgen.serve.wandb_lora import resolve_sources

    metrics = ServeMetrics(cfg.max_batch_size)
    if sources is None:
        sources = resolve_sources(cfg)
    served = Served(cfg, sources)
    reloader = Reloader(
        source_cfg or cfg,
        served,
        shared=lambda: server.shared,
        status=lambda: server.workers_setup_status,
        timeout=cfg.reload_timeout,
        wandb_api=wandb_api,
    )
    photos = PhotoMonitor(cfg, metrics.registry) if cfg.features_wanted else None
    server = CVGenServer(
        Img2ImgAPI(cfg, api_key=api_key),
        Ingress(cfg),
        metrics,
        reloader,
        photos,
        accelerator=cfg.litserve_accelerator,
        devices=cfg.devices,
        workers_per_device=cfg.workers_per_device,
        restart_workers=True,  # workers report which request they took (see cvgen.serve.workers)
        timeout=cfg.queue_timeout,
        max_payload_size=cfg.max_body_bytes,
        middlewares=[(ObserveMiddleware, {"metrics": metrics})],
        disable_openapi_url=True,
    )
    # uvicorn's drain time on SIGTERM (LitServe's default is 30 s)
    server.uvicorn_graceful_timeout = max(1, round(cfg.shutdown_grace))
    return server
