"""The LitAPI: model loading and batched img2img in the inference worker, and API-key auth.

Requests arrive here already validated (see :mod:`cvgen.serve.ingress`); the worker only runs
the model and encodes JPEGs, and reports batch size, predict time and memory with each image.
"""

from __future__ import annotations

import secrets
from typing import Any

import litserve as ls
from fastapi import HTTPException, Request

from cvgen.images import jpeg_bytes
from cvgen.serve.config import ServeConfig
from cvgen.serve.engine import GenRequest, GenResult, Img2ImgEngine
from cvgen.serve.schema import GenParams

# paths that answer without a key (probes)
PUBLIC_PATHS = frozenset({"/health"})


class Img2ImgAPI(ls.LitAPI):
    """img2img with dynamic batching; ``api_key`` (None: no auth) guards all but /health."""

    def __init__(self, cfg: ServeConfig, api_key: str | None = None) -> None:
        super().__init__(
            max_batch_size=cfg.max_batch_size,
            batch_timeout=cfg.batch_timeout,
            api_path="/predict",
        )
        self.cfg = cfg
        self._api_key = api_key
        self.engine: Img2ImgEngine | None = None

    def __repr__(self) -> str:  # never show the key
        return f"Img2ImgAPI(base={self.cfg.base!r}, lora={self.cfg.lora!r})"

    # --- auth (a FastAPI dependency; LitServe puts it on every route, /health included) ---
    def authorize(self, request: Request) -> None:
        """Accept ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``; /health is open."""
        if self._api_key is None or request.url.path in PUBLIC_PATHS:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
        if given is None or not secrets.compare_digest(
            given.encode("utf-8", "surrogateescape"), self._api_key.encode()
        ):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong API key (X-API-Key header)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # --- inference worker ---
    def setup(self, device: str) -> None:
        """Load the pipeline on ``device`` (the config's device wins unless it is auto)."""
        chosen = device if self.cfg.device == "auto" and device else self.cfg.device
        self.engine = Img2ImgEngine.load(self.cfg, chosen)

    def decode_request(self, request: Any) -> GenRequest:  # type: ignore[override]
        """The validated payload from the API server (see ingress.Job.payload)."""
        if not isinstance(request, dict) or not isinstance(request.get("params"), GenParams):
            raise HTTPException(400, "malformed internal request")
        return GenRequest(request["image"], request["params"])

    def batch(self, inputs: list[GenRequest]) -> list[GenRequest]:
        return list(inputs)

    def predict(self, x: Any) -> Any:
        assert self.engine is not None, "setup() has not run"
        if isinstance(x, GenRequest):  # max_batch_size == 1: no batch()/unbatch()
            return self.engine.generate([x])[0]
        return self.engine.generate(x)

    def unbatch(self, output: list[GenResult]) -> list[GenResult]:
        return list(output)

    def encode_response(self, output: GenResult) -> dict[str, Any]:  # type: ignore[override]
        """JPEG bytes plus what the API server reports in headers and metrics."""
        assert self.engine is not None
        return {
            "jpeg": jpeg_bytes(output.image, quality=self.cfg.jpeg_quality),
            "width": output.image.width,
            "height": output.image.height,
            "params": output.params.public(),
            "batch_size": output.batch_size,
            "batch_index": output.batch_index,
            "predict_seconds": output.predict_seconds,
            "memory": self.engine.memory(),
        }
