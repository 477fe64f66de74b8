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
from typing import Any

import litserve as ls
from fastapi import HTTPException, Request

from cvgen.serve.config import ServeConfig
from cvgen.serve.engine import Img2ImgEngine, worker_id
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
        # the dict shared with the API server (cvgen.serve.workers; set before workers start)
        self.shared: Any = None

    def __repr__(self) -> str:  # never show the key
        return f"Img2ImgAPI(base={self.cfg.base!r}, loras={self.cfg.lora_map!r})"

    @property
    def secured(self) -> bool:
        """Whether requests need the API key."""
        return self._api_key is not None

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
        """Load the pipeline on ``device`` (the config's device wins unless it is auto): the
        LoRAs of the latest reload if there was one (:mod:`cvgen.serve.reload`), then watch
        for reloads."""
        from cvgen.serve.reload import ACK, ReloadWatch, target_cfg

        configure_logging(self.cfg.log_level)
        chosen = device if self.cfg.device == "auto" and device else self.cfg.device
        cfg, generation = target_cfg(self.cfg, self.shared)
        self.engine = Img2ImgEngine.load(cfg, chosen)
        if self.shared is None:
            return
        worker = worker_id()
        if generation:
            self.shared[f"{ACK}{worker}"] = [generation, ""]

        def swap(engine: Img2ImgEngine) -> None:
            self.engine = engine  # one reference assignment: a batch keeps the engine it began with

        load = lambda c: Img2ImgEngine.load(c, chosen)  # noqa: E731
        ReloadWatch(self.shared, worker, cfg, generation, load, swap).start()

    def predict(  # type: ignore[override]
        self, x: GenRequest | list[GenRequest]
    ) -> GenResult | list[GenResult]:
        """A list of requests (max_batch_size > 1) or one request (LitServe then batches none)."""
        engine = self.engine  # a reload swaps it between batches, never during one
        assert engine is not None, "setup() has not run"
        if isinstance(x, GenRequest):
            return engine.generate([x])[0]
        log.debug("batch of %d: %s", len(x), " ".join(r.request_id for r in x))
        return engine.generate(x)
