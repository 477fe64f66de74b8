"""What cvgen's server takes from LitServe's internals, checked against the installed LitServe.

``/predict`` is LitServe's own route swapped for a validating one (see cvgen/serve/server.py).
If an upgrade changes how LitServe registers that route or queues a request, these fail, and
the pin in pyproject.toml says which versions have what the server uses.
"""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version
from pathlib import Path

import litserve as ls
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from litserve.server import RegularRequestHandler
from packaging.requirements import Requirement

from cvgen.serve.api import Img2ImgAPI
from cvgen.serve.config import ServeConfig
from cvgen.serve.schema import GenRequest
from cvgen.serve.server import CVGenServer, build_server

KEY = "internals-key"
CFG = ServeConfig(device="cpu")


def _post_routes(server: ls.LitServer, path: str) -> list[APIRoute]:
    return [
        r
        for r in server.app.routes
        if isinstance(r, APIRoute) and r.path == path and "POST" in (r.methods or ())
    ]


def test_the_route_we_replace_is_the_one_litserve_registers() -> None:
    # the method we override is the one LitServer.__init__ calls, with the same parameters
    ours = inspect.signature(CVGenServer._register_api_endpoints).parameters
    theirs = inspect.signature(ls.LitServer._register_api_endpoints).parameters
    assert list(ours) == list(theirs)

    plain = ls.LitServer(Img2ImgAPI(CFG, api_key=KEY), accelerator="cpu")
    server = build_server(CFG, api_key=KEY)
    [litserve_route] = _post_routes(plain, "/predict")
    [route] = _post_routes(server, "/predict")
    assert litserve_route.endpoint.__qualname__.startswith("LitServer._register_api_endpoints")
    assert route.endpoint.__qualname__.startswith("CVGenServer.validating_endpoint")
    # same auth dependency as LitServe put on its route, and no other route changed
    assert [d.dependency.__name__ for d in route.dependencies] == ["authorize"]
    assert [d.dependency.__name__ for d in litserve_route.dependencies] == ["authorize"]
    paths = {
        (r.path, tuple(sorted(r.methods or ())))
        for r in plain.app.routes
        if isinstance(r, APIRoute)
    }
    ours_paths = {
        (r.path, tuple(sorted(r.methods or ())))
        for r in server.app.routes
        if isinstance(r, APIRoute)
    }
    added = {
        ("/metrics", ("GET",)),
        ("/looks", ("GET",)),
        ("/loras", ("GET",)),
        ("/admin/reload", ("POST",)),
    }
    # the web page replaces LitServe's "litserve running" at / (cvgen/serve/page.py)
    page = {("/", ("GET", "HEAD")), ("/docs", ("GET",)), ("/openapi.json", ("GET",))}
    assert ours_paths - paths == added | page
    assert paths - {("/", ("GET",))} <= ours_paths


def test_our_handler_answers_and_litserve_own_would_have_queued() -> None:
    # no workers and no queues (no lifespan): only a handler that answers before queueing
    # can answer at all
    request = {"data": {"prompt": "x"}, "headers": {"X-API-Key": KEY}}
    ours = TestClient(build_server(CFG, api_key=KEY).app).post("/predict", **request)
    assert ours.status_code == 422
    assert ours.json() == {
        "detail": "image: is required: send a file 'image', 'image_b64' or 'image_url'",
        "field": "image",
    }
    plain = ls.LitServer(Img2ImgAPI(CFG, api_key=KEY), accelerator="cpu")
    theirs = TestClient(plain.app, raise_server_exceptions=False).post("/predict", **request)
    assert theirs.status_code == 500  # LitServe's route went straight for the queue
    assert TestClient(build_server(CFG, api_key=KEY).app).post("/predict").status_code == 401


def test_litserve_queues_our_request_object_as_it_is() -> None:
    server = build_server(CFG, api_key=None)
    handler = RegularRequestHandler(server.lit_api, server)
    job = object()
    assert asyncio.run(handler._prepare_request(job, GenRequest)) is job


def test_a_litserve_that_registers_elsewhere_fails_at_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ls.LitServer, "_register_api_endpoints", lambda *args: None)
    with pytest.raises(RuntimeError, match=r"litserve .*expected LitServer to register one POST"):
        build_server(CFG, api_key=None)


def test_litserve_pin_admits_only_versions_with_what_the_server_uses() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    [req] = [
        r for r in map(Requirement, project["project"]["dependencies"]) if r.name == "litserve"
    ]
    # LitServer.setup_auth(lit_api) (per-API auth on our routes) first appears in 0.2.18;
    # RegularRequestHandler in 0.2.11, disable_openapi_url in 0.2.14
    assert "lit_api" in inspect.signature(ls.LitServer.setup_auth).parameters
    assert not req.specifier.contains("0.2.17") and req.specifier.contains("0.2.18")
    assert req.specifier.contains(version("litserve"))
    assert not req.specifier.contains("0.3.0")  # 0.3 drops the arguments 0.2 deprecates
