"""Build the LitServer: the img2img LitAPI, a validating ``/predict``, ``/metrics`` and the
middlewares (body limit, metrics + access log).

``/predict`` is LitServe's own request handler (queue, dynamic batching, timeouts) behind a
route of ours that first validates the request in the API-server process: LitServe fails a
whole batch when any request in it raises, so only valid requests may enter the queue.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import litserve as ls
from fastapi import Depends, Request, Response
from fastapi.responses import JSONResponse
from litserve.server import RegularRequestHandler

from cvgen.serve.api import Img2ImgAPI
from cvgen.serve.config import ServeConfig
from cvgen.serve.engine import model_resolution
from cvgen.serve.ingress import Ingress
from cvgen.serve.metrics import ServeMetrics
from cvgen.serve.middleware import BodyLimitMiddleware, ObserveMiddleware
from cvgen.serve.schema import ClientError

log = logging.getLogger(__name__)


def result_response(result: dict[str, Any], want_json: bool) -> Response:
    """The HTTP answer for one generated image: JPEG bytes, or JSON with base64."""
    params = result["params"]
    headers = {
        "X-Seed": str(params["seed"]),
        "X-Parameters": json.dumps(params, separators=(",", ":")),
        "X-Batch-Size": str(result["batch_size"]),
    }
    if want_json:
        body = {
            "image_b64": base64.b64encode(result["jpeg"]).decode("ascii"),
            "media_type": "image/jpeg",
            "width": result["width"],
            "height": result["height"],
            "seed": params["seed"],
            "parameters": params,
        }
        return JSONResponse(body, headers=headers)
    return Response(result["jpeg"], media_type="image/jpeg", headers=headers)


class CVGenServer(ls.LitServer):
    """A LitServer whose ``/predict`` validates before queueing (see the module docstring)."""

    def __init__(self, lit_api: Img2ImgAPI, ingress: Ingress, metrics: ServeMetrics, **kw: Any):
        self.ingress = ingress
        self.metrics = metrics
        super().__init__(lit_api, **kw)
        self.app.add_api_route(
            "/metrics",
            self._metrics_endpoint,
            methods=["GET"],
            dependencies=[Depends(self.setup_auth(lit_api))],
            include_in_schema=False,
        )

    async def _metrics_endpoint(self) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    def _register_api_endpoints(self, lit_api: ls.LitAPI, request_type: Any, response_type: Any):
        # Replaces LitServer's route for the API path with a validating one that hands the
        # parsed job to LitServe's RegularRequestHandler (litserve 0.2.x internals).
        handler = RegularRequestHandler(lit_api, self)
        ingress, metrics = self.ingress, self.metrics

        async def predict(request: Request) -> Response:
            state = request.scope.setdefault("state", {})
            try:
                job = await ingress.parse(request, state.get("request_id", ""))
            except ClientError as e:
                state["error_field"] = e.field
                return JSONResponse(e.body(), status_code=e.status)
            result = await handler.handle_request(job.payload(), dict)
            metrics.observe_result(result)
            state["batch_size"] = result["batch_size"]
            return result_response(result, job.want_json)

        self.app.add_api_route(
            lit_api.api_path,
            predict,
            methods=["POST"],
            dependencies=[Depends(self.setup_auth(lit_api))],
            response_model=None,
        )


def build_server(cfg: ServeConfig, api_key: str | None = None) -> CVGenServer:
    """The LitServer for ``cfg``; ``cfg.lora`` must already be a local path (see
    :func:`cvgen.serve.wandb_lora.resolve_lora`). ``api_key`` None disables auth."""
    api = Img2ImgAPI(cfg, api_key=api_key)
    has_lora = bool(cfg.lora)
    ingress = Ingress(
        cfg,
        resolution=cfg.resolution or model_resolution(cfg.base),
        lora_loaded=has_lora,
        fixed_lora_scale=cfg.lora_scale if (has_lora and cfg.fuse_lora) else None,
    )
    metrics = ServeMetrics()
    accelerator = "cpu" if cfg.device == "cpu" else "auto"
    server = CVGenServer(
        api,
        ingress,
        metrics,
        accelerator=accelerator,
        devices=1,
        workers_per_device=1,
        timeout=cfg.queue_timeout,
        middlewares=[
            (BodyLimitMiddleware, {"max_bytes": cfg.max_body_bytes}),
            (ObserveMiddleware, {"metrics": metrics}),
        ],
        disable_openapi_url=True,
    )
    # uvicorn's drain time on SIGTERM (LitServe's default is 30 s)
    server.uvicorn_graceful_timeout = max(1, round(cfg.shutdown_grace))
    return server
