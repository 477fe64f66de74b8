"""From an HTTP request to a validated :class:`GenRequest`, in the API-server process, before
any queue.

Validation runs here and not in the inference worker on purpose: LitServe answers a whole
batch with the error of any one request in it, so a bad request must never reach a batch.
Each mistake is a :class:`ClientError` with a 4xx status naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from cvgen.netfetch import FetchError, fetch_image_bytes, parse_networks
from cvgen.portrait import face_detector
from cvgen.serve.config import ServeConfig
from cvgen.serve.looks import Look, load_looks
from cvgen.serve.schema import (
    ClientError,
    GenParams,
    GenRequest,
    check_image_sources,
    decode_photo,
    frame_request_photo,
)

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def answer_format(request: Request) -> str:
    """``json`` (``Accept: application/json``: the JPEG in base64 with the details), ``png``
    (``Accept: image/png``: lossless) or ``jpeg`` (anything else)."""
    accept = request.headers.get("accept", "").lower()
    if "image/jpeg" not in accept:
        if "application/json" in accept:
            return "json"
        if "image/png" in accept:
            return "png"
    return "jpeg"


def decode_b64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ClientError(422, "image_b64", "must be a base64 string")
    if text.startswith("data:") and "," in text:  # a data: URL
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(422, "image_b64", "is not valid base64") from None


class Ingress:
    """Reads and validates ``POST /predict`` bodies for one server configuration."""

    def __init__(self, cfg: ServeConfig, looks: dict[str, Look] | None = None) -> None:
        self.cfg = cfg
        self.looks = load_looks(cfg) if looks is None else looks
        self.allowlist = parse_networks(cfg.url_allowlist)
        self.detector = face_detector()  # cvgen data prepare's: serving frames as training did
        # called with every photo that decodes (drift monitoring: cvgen.serve.drift)
        self.on_photo: Callable[[Image.Image], object] | None = None

    async def _read_form(self, request: Request) -> tuple[dict[str, Any], bytes | None, bool]:
        try:
            form = await request.form(max_files=2, max_fields=32)
        except (MultiPartException, HTTPException) as e:
            if isinstance(e, HTTPException) and e.status_code == 413:
                raise  # the body limit (LitServe's max_payload_size), answered as it is
            detail = getattr(e, "message", None) or getattr(e, "detail", "")
            raise ClientError(400, None, f"malformed form body: {detail}") from None
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise ClientError(400, None, f"malformed form body ({type(e).__name__})") from None
        fields: dict[str, Any] = {}
        data: bytes | None = None
        has_file = False
        try:
            for key in form:
                values = form.getlist(key)
                if len(values) > 1:
                    raise ClientError(422, key[:64], "given more than once")
                value = values[0]
                if key == "image":
                    if not isinstance(value, UploadFile):
                        raise ClientError(422, "image", "must be a file upload")
                    data = await value.read()
                    has_file = len(data) > 0
                    if not has_file:
                        raise ClientError(422, "image", "is an empty file")
                elif isinstance(value, UploadFile):
                    raise ClientError(422, key[:64], "must be a text field, not a file")
                else:
                    fields[key] = value
        finally:
            await form.close()
        return fields, data, has_file

    async def _read_json(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except RecursionError:  # the C decoder recurses once per level of nesting
            raise ClientError(400, None, "the JSON body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError):
            raise ClientError(400, None, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ClientError(422, None, "the JSON body must be an object")
        return body

    async def parse(self, request: Request, request_id: str = "") -> GenRequest:
        """Validate a request and decode its photo; :class:`ClientError` on any mistake."""
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype in FORM_TYPES:
            fields, data, has_file = await self._read_form(request)
        elif ctype == "application/json":
            fields, data, has_file = await self._read_json(request), None, False
            if "image" in fields:
                raise ClientError(422, "image", "send the photo as image_b64 in a JSON body")
        else:
            raise ClientError(
                415,
                None,
                "unsupported media type: send multipart/form-data or application/json",
            )
        source = check_image_sources(
            {
                "image": has_file,
                "image_b64": fields.get("image_b64") not in (None, ""),
                "image_url": fields.get("image_url") not in (None, ""),
            }
        )
        image_fields = {k: fields.pop(k) for k in ("image_b64", "image_url") if k in fields}
        params = GenParams.parse(fields, self.cfg, self.looks)
        if source == "image_b64":
            data = decode_b64(image_fields["image_b64"])
        elif source == "image_url":
            url = image_fields["image_url"]
            if not isinstance(url, str):
                raise ClientError(422, "image_url", "must be a string")
            if not self.cfg.url_fetch:
                raise ClientError(422, "image_url", "fetching URLs is disabled on this server")
            try:
                data = await fetch_image_bytes(
                    url,
                    self.allowlist,
                    max_bytes=self.cfg.url_max_bytes,
                    max_redirects=self.cfg.url_max_redirects,
                    timeout=self.cfg.url_timeout,
                )
            except FetchError as e:  # a refused address is 403; any other failure 422
                status = 403 if e.reason == "blocked_address" else 422
                raise ClientError(status, "image_url", e.message) from None
        assert data is not None
        return await run_in_threadpool(self._frame, data, source, params, request_id)

    def _frame(self, data: bytes, source: str, params: GenParams, request_id: str) -> GenRequest:
        """Decode, detect the face and frame (a worker thread: detection takes CPU time)."""
        photo = decode_photo(data, source, self.cfg.max_pixels)
        if self.on_photo is not None:
            self.on_photo(photo)
        framed, detect_s = frame_request_photo(photo, source, params, self.cfg, self.detector)
        return GenRequest.framed(
            framed, params, request_id=request_id, timings={"detect": detect_s}
        )
