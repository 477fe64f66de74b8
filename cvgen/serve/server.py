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

import base64
import dataclasses
import io
import json
import logging
from collections.abc import Callable, Coroutine
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
from cvgen.serve.ingress import Ingress, answer_format
from cvgen.serve.looks import look_list
from cvgen.serve.metrics import ServeMetrics
from cvgen.serve.middleware import ObserveMiddleware
from cvgen.serve.schema import ClientError, GenRequest, GenResult

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
    """A LitServer whose ``/predict`` validates before queueing (see the module docstring)."""

    def __init__(self, lit_api: Img2ImgAPI, ingress: Ingress, metrics: ServeMetrics, **kw: Any):
        self.ingress = ingress
        self.metrics = metrics
        super().__init__(lit_api, **kw)
        auth = [Depends(self.setup_auth(lit_api))]
        self.app.add_api_route(
            "/metrics",
            self._metrics_endpoint,
            methods=["GET"],
            dependencies=auth,
            include_in_schema=False,
        )
        looks = look_list(ingress.looks)
        loras = lora_list(ingress.cfg)

        async def list_looks() -> JSONResponse:
            """The looks a request may name in ``look``: name, description and settings."""
            return JSONResponse({"looks": looks})

        async def list_loras() -> JSONResponse:
            """The LoRAs a request may name in ``lora``: name, whether it is the default, its
            scale, and what it was trained on (``cvgen_lora.json``; {} for a LoRA from
            elsewhere)."""
            return JSONResponse({"loras": loras})

        self.app.add_api_route("/looks", list_looks, methods=["GET"], dependencies=auth)
        self.app.add_api_route("/loras", list_loras, methods=["GET"], dependencies=auth)
        self.app.add_exception_handler(HTTPException, self._http_error)

    async def _metrics_endpoint(self) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

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
        )

    def validating_endpoint(self, lit_api: ls.LitAPI) -> Endpoint:
        """``POST /predict``: validate (4xx naming the field), then queue the
        :class:`GenRequest` through LitServe's own handler and answer its :class:`GenResult`."""
        handler = RegularRequestHandler(lit_api, self)
        ingress, metrics = self.ingress, self.metrics

        async def predict(request: Request) -> Response:
            state = request.scope.setdefault("state", {})
            try:
                job = await ingress.parse(request, state.get("request_id", ""))
            except ClientError as e:
                state["error_field"] = e.field
                return JSONResponse(e.body(), status_code=e.status)
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


def build_server(cfg: ServeConfig, api_key: str | None = None) -> CVGenServer:
    """The LitServer for ``cfg``; its LoRAs must already be local paths (see
    :func:`cvgen.serve.wandb_lora.resolve_loras`). ``api_key`` None disables auth."""
    metrics = ServeMetrics()
    server = CVGenServer(
        Img2ImgAPI(cfg, api_key=api_key),
        Ingress(cfg),
        metrics,
        accelerator="cpu" if cfg.device == "cpu" else "auto",
        devices=1,
        workers_per_device=1,
        timeout=cfg.queue_timeout,
        max_payload_size=cfg.max_body_bytes,
        middlewares=[(ObserveMiddleware, {"metrics": metrics})],
        disable_openapi_url=True,
    )
    # uvicorn's drain time on SIGTERM (LitServe's default is 30 s)
    server.uvicorn_graceful_timeout = max(1, round(cfg.shutdown_grace))
    return server
