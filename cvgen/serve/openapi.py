"""The OpenAPI contract of ``POST /predict``: what ``/openapi.json`` and ``/docs`` show.

``/predict`` reads its body itself (multipart or JSON, validated by :class:`GenParams`), so
FastAPI cannot infer it. The request bodies here are built from :class:`GenParams` (its fields,
types, bounds and descriptions) with this server's defaults filled in (its config and looks),
plus the photo fields; the answers and the error body are pydantic models that a test checks
against what the server really sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from cvgen.serve.config import ServeConfig
from cvgen.serve.schema import FromConfig, GenParams

# what a JSON bound is called in OpenAPI 3.1 (pydantic names them after its own arguments here:
# the constraints sit beside before-validators)
_BOUNDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}
ERROR_STATUSES = {
    "400": "malformed body (not a form, not JSON, nested too deeply)",
    "401": "missing or wrong API key (X-API-Key header); `field` is null",
    "403": "image_url points to a refused address (private, loopback, metadata)",
    "413": "the body is larger than max_body_bytes",
    "415": "neither multipart/form-data nor application/json",
    "422": "a field is wrong: no face found, not an image, unknown look, out of range, ...",
    "504": "the request waited longer than queue_timeout",
}
ANSWER_HEADERS = {
    "X-Seed": "the seed used (send it back as `seed` to get the same image)",
    "X-Parameters": "every parameter used but the prompts, as JSON",
    "X-Face-Box": "x,y,w,h of the face in the answer's pixels (absent without a face)",
    "X-Faces-Found": "how many faces the photo has (the largest is framed)",
    "X-Batch-Size": "requests in the pipeline call that made this image",
    "Server-Timing": "milliseconds of detect, mask, generate, composite",
}


class ErrorBody(BaseModel):
    """The body of every error answer."""

    model_config = ConfigDict(extra="forbid")

    detail: str = Field(description="what is wrong, in words, starting with the field's name")
    field: str | None = Field(description="the request field at fault (null: none in particular)")


class FaceBox(BaseModel):
    """The face in the answer's pixels."""

    model_config = ConfigDict(extra="forbid")

    x: int
    y: int
    w: int
    h: int


class PortraitJSON(BaseModel):
    """The answer with ``Accept: application/json``."""

    model_config = ConfigDict(extra="forbid")

    image_b64: str = Field(description="the JPEG, base64")
    media_type: str = Field(description="image/jpeg")
    width: int
    height: int
    seed: int
    parameters: dict[str, Any] = Field(description="every parameter used but the prompts")
    face_box: FaceBox | None = Field(description="the face in the answer's pixels")
    faces_found: int


COMPONENTS: tuple[type[BaseModel], ...] = (ErrorBody, FaceBox, PortraitJSON)
REF = "#/components/schemas/{model}"


def component_schemas() -> dict[str, Any]:
    """The answer models as OpenAPI components (referred to as ``#/components/schemas/Name``)."""
    out = {}
    for model in COMPONENTS:
        schema = model.model_json_schema(ref_template=REF)
        schema.pop("$defs", None)  # each nested model is a component of its own
        out[model.__name__] = schema
    return out


def param_properties(cfg: ServeConfig, looks: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The JSON schema of each :class:`GenParams` field, as a request sends it: no field is
    required by itself (``prompt`` unless a look is sent), defaults are this server's."""
    schema = GenParams.model_json_schema()
    props: dict[str, dict[str, Any]] = {}
    for name, info in GenParams.model_fields.items():
        prop = {k: v for k, v in schema["properties"][name].items() if k != "title"}
        for ours, theirs in _BOUNDS.items():
            if ours in prop:
                bound = prop.pop(ours)
                prop[theirs] = int(bound) if prop.get("type") == "integer" else bound
        if "anyOf" in prop:  # optional text: null means "not sent"
            (prop["type"],) = [t["type"] for t in prop.pop("anyOf") if t["type"] != "null"]
        default = next((m for m in info.metadata if isinstance(m, FromConfig)), None)
        prop.pop("default", None)
        if default is not None and getattr(cfg, default.key) is not None:
            prop["default"] = getattr(cfg, default.key)
        props[name] = prop
    props["prompt"]["description"] += " (required unless a look is sent)"
    if looks:
        props["look"]["enum"] = list(looks)
    if cfg.lora_map:
        props["lora"]["enum"] = list(cfg.lora_map)
    return props


def request_bodies(cfg: ServeConfig, looks: Mapping[str, Any]) -> dict[str, Any]:
    """The ``requestBody`` of ``POST /predict``: multipart (a file ``image``) or JSON
    (``image_b64``); either may send ``image_url`` instead."""
    params = param_properties(cfg, looks)
    url = {
        "type": "string",
        "format": "uri",
        "description": "fetch the photo from this public http(s) URL instead"
        + ("" if cfg.url_fetch else " (disabled on this server)"),
    }

    def body(image: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
        return {
            "schema": {
                "type": "object",
                "properties": {**image, "image_url": url, **params},
                "additionalProperties": False,
            },
            "example": example,
        }

    look = next(iter(looks), None)
    example: dict[str, Any] = {"look": look} if look else {"prompt": "a professional headshot"}
    return {
        "required": True,
        "description": "the photo (exactly one of image, image_b64, image_url) and the "
        "generation fields; a blank field gets its default",
        "content": {
            "multipart/form-data": {
                **body(
                    {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "the photo (JPEG, PNG, WebP, ...)",
                        }
                    },
                    {**example, "framing": "4:5"},
                ),
                "encoding": {"image": {"contentType": "image/*"}},
            },
            "application/json": body(
                {
                    "image_b64": {
                        "type": "string",
                        "contentEncoding": "base64",
                        "description": "the photo, base64 (a data: URL is accepted)",
                    }
                },
                {**example, "image_b64": "/9j/4AAQSkZJRg...", "seed": 42},
            ),
        },
    }


def predict_openapi(cfg: ServeConfig, looks: Mapping[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for the ``POST /predict`` route: request bodies and answers."""
    error = {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}}
    headers = {
        name: {"description": text, "schema": {"type": "string"}}
        for name, text in ANSWER_HEADERS.items()
    }
    return {
        "summary": "Make a portrait from a photo",
        "description": "Frames head and shoulders on the face, keeps the face (keep_face) "
        "and regenerates the rest in a look. The answer is a JPEG; `Accept: image/png` gives "
        "a PNG, `Accept: application/json` the JPEG in base64 with the details.",
        "requestBody": request_bodies(cfg, looks),
        "responses": {
            "200": {
                "description": "the portrait",
                "headers": headers,
                "content": {
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {"schema": {"$ref": REF.format(model="PortraitJSON")}},
                },
            },
            **{
                status: {"description": text, "content": error}
                for status, text in ERROR_STATUSES.items()
            },
        },
    }


def openapi_document(app: FastAPI, secured: bool) -> dict[str, Any]:
    """The OpenAPI document of ``app`` (cached on it); with ``secured``, the API-key header as
    a security scheme on every route but /health (Swagger UI's "Authorize")."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(
        title="cvgen portrait server",
        version=_version(),
        description="Turns a photo into a CV portrait. Every error has the body "
        '`{"detail": ..., "field": ...}`. The web page is at `/`.',
        routes=app.routes,
    )
    doc.setdefault("components", {}).setdefault("schemas", {}).update(component_schemas())
    if secured:
        doc["components"]["securitySchemes"] = {
            "APIKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        }
        for path, ops in doc.get("paths", {}).items():
            if path != "/health":
                for op in ops.values():
                    op["security"] = [{"APIKey": []}]
    app.openapi_schema = doc
    return doc


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cvgen")
    except PackageNotFoundError:
        return "0"
