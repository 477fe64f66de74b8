"""The LitAPI: model loading and batched img2img in the inference worker, and API-key auth.

Requests arrive already validated, as :class:`cvgen.serve.schema.GenRequest` objects (see
:mod:`cvgen.serve.ingress`); the worker only runs the model. LitServe's default hooks do the
rest: ``decode_request``/``encode_response`` pass the request and the
:class:`cvgen.serve.schema.GenResult` through, ``batch`` gives ``predict`` the list of
requests and ``unbatch`` hands back one result per request.
"""

from __future__ import annotations

import logging
import secrets

import litserve as ls
from fastapi import HTTPException, Request

from cvgen.serve.config import ServeConfig
from cvgen.serve.engine import Img2ImgEngine
from cvgen.serve.logs import configure_logging
from cvgen.serve.schema import GenRequest, GenResult

log = logging.getLogger(__name__)
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
        return f"Img2ImgAPI(base={self.cfg.base!r}, loras={self.cfg.lora_map!r})"

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

    # --- inference worker (a process LitServe spawns: it sets up its own logging) ---
    def setup(self, device: str) -> None:
        """Load the pipeline on ``device`` (the config's device wins unless it is auto)."""
        configure_logging(self.cfg.log_level)
        chosen = device if self.cfg.device == "auto" and device else self.cfg.device
        self.engine = Img2ImgEngine.load(self.cfg, chosen)

    def predict(  # type: ignore[override]
        self, x: GenRequest | list[GenRequest]
    ) -> GenResult | list[GenResult]:
        """A list of requests (max_batch_size > 1) or one request (LitServe then batches none)."""
        assert self.engine is not None, "setup() has not run"
        if isinstance(x, GenRequest):
            return self.engine.generate([x])[0]
        log.debug("batch of %d: %s", len(x), " ".join(r.request_id for r in x))
        return self.engine.generate(x)
