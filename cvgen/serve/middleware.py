"""The server's ASGI middleware: metrics and one access-log line per request.

It is plain ASGI (no ``BaseHTTPMiddleware``), so it sees every request, including those that fail
before a route runs. (The body limit is LitServe's ``max_payload_size``.)
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cvgen.serve.logs import ACCESS_LOGGER
from cvgen.serve.metrics import ServeMetrics

access_log = logging.getLogger(ACCESS_LOGGER)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ObserveMiddleware:
    """Counts requests by status, times them, tracks those in flight, and logs one JSON line
    per request: id, method, path, status, latency and (for /predict) batch size. It never
    logs bodies, query strings or headers, so no image bytes and no keys reach the log."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID.match(candidate):
                    request_id = candidate
        request_id = request_id or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        t0 = time.perf_counter()
        path = self.metrics.path_label(scope["path"])
        self.metrics.in_flight.inc()

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            seconds = time.perf_counter() - t0
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.latency.labels(path).observe(seconds)
            line: dict[str, Any] = {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "severity": "INFO" if status < 500 else "ERROR",
                "event": "request",
                "id": request_id,
                "method": scope["method"],
                "path": path,
                "status": status,
                "latency_ms": round(seconds * 1000, 1),
            }
            if "batch_size" in state:
                line["batch_size"] = state["batch_size"]
            if "error_field" in state:
                line["error_field"] = state["error_field"]
            access_log.info(json.dumps(line))
