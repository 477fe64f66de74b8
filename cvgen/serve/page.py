"""The web page at ``/`` (upload a photo, pick a look, get the portrait) and the API
documentation at ``/docs``, both served from files inside the package.

Nothing is loaded from elsewhere: the page's HTML, CSS and JavaScript are in
``cvgen/serve/static/``, Swagger UI's in the ``fastapi-offline`` package. Every HTML answer
carries a strict Content-Security-Policy (scripts and styles only from this server, no inline
script), so the page works offline and behind that policy. The page and its files need no API
key (a browser cannot send a header when it opens a page); the page asks for the key when
``GET /looks`` answers 401 and sends it as ``X-API-Key``.
"""

from __future__ import annotations

import html
import importlib.resources
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from cvgen.serve.config import ServeConfig
from cvgen.serve.openapi import openapi_document

STATIC = Path(__file__).resolve().parent / "static"
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HTML_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class PackageFiles(StaticFiles):
    """Static files with ``nosniff`` and a revalidating cache (they change with the package)."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-cache"
        return response


def swagger_assets() -> Path:
    """Swagger UI's files (``swagger-ui-bundle.js``, ``swagger-ui.css``), from the
    ``fastapi-offline`` package."""
    return Path(str(importlib.resources.files("fastapi_offline") / "static"))


def render(name: str, values: dict[str, Any]) -> str:
    """``static/<name>`` with each ``{{key}}`` replaced by its value, HTML-escaped."""
    text = (STATIC / name).read_text(encoding="utf-8")
    for key, value in values.items():
        if isinstance(value, bool):
            value = str(value).lower()
        text = text.replace("{{" + key + "}}", html.escape(str(value)))
    return text


def install_page(app: FastAPI, cfg: ServeConfig, secured: bool) -> None:
    """Serve the page at ``/`` (in place of LitServe's "litserve running"), its files under
    ``/static/``, and, with ``cfg.docs``, ``/openapi.json`` and Swagger UI at ``/docs``."""
    app.router.routes[:] = [
        r
        for r in app.router.routes
        if not (isinstance(r, APIRoute) and r.path == "/" and "GET" in (r.methods or ()))
    ]
    page = render(
        "index.html",
        {"keep_face": cfg.default_keep_face, "framing": cfg.default_framing, "docs": cfg.docs},
    )

    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=HTML_HEADERS)

    app.add_api_route("/", index, methods=["GET", "HEAD"], include_in_schema=False)
    if cfg.docs:
        docs = render("docs.html", {})

        async def openapi() -> JSONResponse:
            return JSONResponse(openapi_document(app, secured))

        async def swagger() -> HTMLResponse:
            return HTMLResponse(docs, headers=HTML_HEADERS)

        app.add_api_route("/openapi.json", openapi, methods=["GET"], include_in_schema=False)
        app.add_api_route("/docs", swagger, methods=["GET"], include_in_schema=False)
        # before /static: a mount answers every path under it
        app.mount("/static/swagger", PackageFiles(directory=swagger_assets()), name="swagger")
    app.mount("/static", PackageFiles(directory=STATIC), name="static")
