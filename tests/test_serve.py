"""The HTTP server in-process (``wrap_litserve_start`` + TestClient) on the tiny model + a LoRA."""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cvgen.serve.config import ServeConfig
from cvgen.serve.schema import GenParams
from cvgen.serve.server import build_server

from .conftest import make_random_lora, scrape, send_together, served

KEY = "test-key-0123456789"
H = {"X-API-Key": KEY}
SIZE = 64  # the tiny model's resolution


def photo_bytes(w: int = 96, h: int = 128, fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


PHOTO = photo_bytes()


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(PHOTO)))
        self.end_headers()
        self.wfile.write(PHOTO)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/photo.jpg"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def client(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    lora = make_random_lora(tiny_model, tmp_path_factory.mktemp("lora"))
    cfg = ServeConfig(
        base=str(tiny_model),
        lora=str(lora),
        device="cpu",
        max_batch_size=4,
        batch_timeout=0.3,
        default_steps=2,
        default_strength=0.5,
        max_steps=4,
        max_body_bytes=300_000,
        max_pixels=1_000_000,
        url_allowlist=["127.0.0.1/32"],
        url_timeout=5,
        default_keep_face=False,  # these photos are noise: no face (tests/test_serve_portrait.py)
    )
    with served(build_server(cfg, api_key=KEY)) as c:
        yield c


def predict(
    c: TestClient, data: dict[str, Any] | None = None, image: bytes | None = PHOTO, **kw: Any
):
    files = {"image": ("photo.jpg", image, "image/jpeg")} if image is not None else None
    return c.post(
        "/predict", data=data or {}, files=files, headers={**H, **kw.pop("headers", {})}, **kw
    )


def decode(content: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(content))
    img.load()
    return img


# --- good requests ------------------------------------------------------------------------


def test_predict_returns_a_jpeg_of_the_model_size(client: TestClient) -> None:
    r = predict(client, {"prompt": "a professional portrait", "seed": "7"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    img = decode(r.content)
    assert (img.format, img.size, img.mode) == ("JPEG", (SIZE, SIZE), "RGB")
    assert r.headers["x-seed"] == "7"
    params = json.loads(r.headers["x-parameters"])
    assert params == {
        "strength": 0.5,
        "steps": 2,
        "guidance_scale": 7.0,
        "seed": 7,
        "lora_scale": 1.0,
        "look": None,
        "lora": "default",
        "keep_face": False,
        "framing": "square",
    }
    assert r.headers["x-faces-found"] == "0" and "x-face-box" not in r.headers
    assert re.fullmatch(r"detect;dur=[\d.]+, generate;dur=[\d.]+", r.headers["server-timing"])
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_same_seed_same_bytes_other_seed_other_image(client: TestClient) -> None:
    a = predict(client, {"prompt": "portrait", "seed": "3"})
    b = predict(client, {"prompt": "portrait", "seed": "3"})
    c = predict(client, {"prompt": "portrait", "seed": "4"})
    assert a.status_code == b.status_code == c.status_code == 200
    assert a.content == b.content
    assert a.content != c.content


def test_json_body_and_json_answer(client: TestClient) -> None:
    body = {"image_b64": base64.b64encode(PHOTO).decode(), "prompt": "portrait", "seed": 3}
    r = client.post("/predict", json=body, headers={**H, "Accept": "application/json"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seed"] == 3 and out["media_type"] == "image/jpeg"
    assert decode(base64.b64decode(out["image_b64"])).size == (SIZE, SIZE)
    # same seed and inputs as the multipart request in the test above: the same image
    assert (
        base64.b64decode(out["image_b64"])
        == predict(client, {"prompt": "portrait", "seed": "3"}).content
    )


def test_image_url_from_an_allowlisted_host(client: TestClient, image_host: str) -> None:
    r = predict(client, {"prompt": "portrait", "image_url": image_host, "seed": "3"}, image=None)
    assert r.status_code == 200, r.text
    assert r.content == predict(client, {"prompt": "portrait", "seed": "3"}).content


def test_concurrent_requests_are_batched_each_gets_its_own_image(client: TestClient) -> None:
    singles = {s: predict(client, {"prompt": f"p{s}", "seed": str(s)}) for s in (11, 12)}
    arrays = {s: np.asarray(decode(r.content), dtype=np.float32) for s, r in singles.items()}
    jobs = {
        "11": {"prompt": "p11", "seed": "11"},
        "12": {"prompt": "p12", "seed": "12"},
        "odd": {"prompt": "p11", "seed": "11", "steps": "4"},  # other steps: split off
    }
    for _attempt in range(3):  # bounded: a busy machine may miss the batch window once
        results = send_together(lambda data: predict(client, data), jobs, timeout=120)
        assert all(results[k].status_code == 200 for k in jobs), results
        if results["11"].headers["x-batch-size"] == "2":
            break
    assert results["11"].headers["x-batch-size"] == results["12"].headers["x-batch-size"] == "2"
    assert results["odd"].headers["x-batch-size"] == "1"
    got = {s: np.asarray(decode(results[str(s)].content), dtype=np.float32) for s in (11, 12)}

    def dist(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).mean())

    # each batched image is its own request's image (close to the same request run alone,
    # far from the other one): batch float maths may differ in the last bits, order may not
    assert dist(got[11], arrays[11]) < dist(got[11], arrays[12])
    assert dist(got[12], arrays[12]) < dist(got[12], arrays[11])
    assert results["odd"].content != results["11"].content


# --- client mistakes: each a 4xx naming the field, and the server stays healthy -------------

TRUNCATED = PHOTO[: len(PHOTO) // 2]
_bomb = io.BytesIO()
Image.new("RGB", (1200, 1000), (90, 90, 90)).save(_bomb, format="PNG")
BOMB = _bomb.getvalue()  # a few kB that decode to 1.2 MP > max_pixels of this server


@pytest.mark.parametrize(
    "data, image, status, field",
    [
        ({"seed": "1"}, PHOTO, 422, "prompt"),
        ({"prompt": "   "}, PHOTO, 422, "prompt"),
        ({"prompt": "x"}, None, 422, "image"),
        ({"prompt": "x", "image_url": "http://127.0.0.1/a.jpg"}, PHOTO, 422, "image_url"),
        ({"prompt": "x", "strength": "0"}, PHOTO, 422, "strength"),
        ({"prompt": "x", "strength": "1.5"}, PHOTO, 422, "strength"),
        ({"prompt": "x", "strength": "nan"}, PHOTO, 422, "strength"),
        ({"prompt": "x", "steps": "0"}, PHOTO, 422, "steps"),
        ({"prompt": "x", "steps": "99"}, PHOTO, 422, "steps"),
        ({"prompt": "x", "steps": "two"}, PHOTO, 422, "steps"),
        ({"prompt": "x", "guidance_scale": "-1"}, PHOTO, 422, "guidance_scale"),
        ({"prompt": "x", "seed": "-5"}, PHOTO, 422, "seed"),
        ({"prompt": "x", "lora_scale": "0.5"}, PHOTO, 422, "lora_scale"),  # fused at 1.0
        ({"prompt": "x", "mood": "happy"}, PHOTO, 422, "mood"),
        ({"prompt": "x"}, b"this is not an image", 422, "image"),
        ({"prompt": "x"}, TRUNCATED, 422, "image"),
        ({"prompt": "x"}, BOMB, 422, "image"),
        ({"prompt": "x"}, b"", 422, "image"),
        ({"prompt": "x", "image_url": "ftp://example.com/a.jpg"}, None, 422, "image_url"),
        ({"prompt": "x", "image_url": "http://169.254.169.254/latest/"}, None, 403, "image_url"),
        ({"prompt": "x", "image_url": "http://[::1]:9/a.jpg"}, None, 403, "image_url"),
    ],
)
def test_form_mistakes(
    client: TestClient, data: dict[str, str], image: bytes | None, status: int, field: str
) -> None:
    r = predict(client, data, image=image)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and field in r.json()["detail"]
    assert client.get("/health").status_code == 200


def test_body_over_the_limit_is_413(client: TestClient) -> None:
    r = predict(client, {"prompt": "x"}, image=b"\xff" * 400_000)
    assert r.status_code == 413
    assert "larger than" in r.json()["detail"]
    # a chunked body (no Content-Length) is cut off while streaming
    chunks = iter([b"{" + b" " * 200_000, b" " * 200_000 + b"}"])
    r = client.post("/predict", content=chunks, headers={**H, "content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "content, ctype, status",
    [
        (b"prompt=x", "text/plain", 415),
        (b"<xml/>", "application/xml", 415),
        (b"", "", 415),
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 422),
        (b'{"prompt": "x", "image_b64": "***"}', "application/json", 422),
        (b'{"prompt": "x", "image_b64": 5}', "application/json", 422),
        (b"--xyz\r\nbroken", "multipart/form-data; boundary=xyz", 422),  # parses as no fields
        (b"x", "multipart/form-data", 400),  # no boundary
    ],
)
def test_body_mistakes(client: TestClient, content: bytes, ctype: str, status: int) -> None:
    headers = {**H, "content-type": ctype} if ctype else H
    r = client.post("/predict", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    assert client.get("/health").status_code == 200


DEEP = 100_000  # far past Python's recursion limit


@pytest.mark.parametrize(
    "body",
    [
        b"[" * DEEP + b"]" * DEEP,
        b'{"prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"a":' * 40_000 + b"1" + b"}" * 40_000,
    ],
    ids=["array", "array-in-a-field", "object"],
)
def test_deeply_nested_json_is_a_400(client: TestClient, body: bytes) -> None:
    r = client.post("/predict", content=body, headers={**H, "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json() == {"detail": "the JSON body is nested too deeply", "field": None}
    assert client.get("/health").status_code == 200


def test_http_errors_have_the_detail_and_field_body(client: TestClient) -> None:
    answers = {
        "no key": (client.post("/predict", data={"prompt": "x"}), 401),
        "wrong key": (
            client.post("/predict", data={"prompt": "x"}, headers={"X-API-Key": "no"}),
            401,
        ),
        "metrics, no key": (client.get("/metrics"), 401),
        "GET /predict": (client.get("/predict", headers=H), 405),
        "unknown path": (client.get("/no-such-path", headers=H), 404),
        "too large": (predict(client, {"prompt": "x"}, image=b"\xff" * 400_000), 413),
    }
    for name, (r, status) in answers.items():
        assert r.status_code == status, (name, r.text)
        body = r.json()
        assert set(body) == {"detail", "field"} and body["field"] is None, (name, body)
        assert isinstance(body["detail"], str) and body["detail"], name
    assert answers["no key"][0].headers["www-authenticate"] == "Bearer"
    assert answers["GET /predict"][0].headers["allow"] == "POST"
    assert "larger than 300000 bytes" in answers["too large"][0].json()["detail"]


# --- auth ---------------------------------------------------------------------------------


def test_auth_guards_predict_and_metrics_not_health(client: TestClient) -> None:
    assert client.get("/health").status_code == 200  # probes need no key
    assert client.post("/predict", data={"prompt": "x"}).status_code == 401
    assert (
        client.post("/predict", data={"prompt": "x"}, headers={"X-API-Key": "wrong"}).status_code
        == 401
    )
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/info").status_code == 401
    # with the key, the same mistake reaches validation
    assert client.post("/predict", data={"prompt": "x"}, headers=H).status_code == 422


# --- metrics and logs -----------------------------------------------------------------------


def test_metrics_count_requests_batches_and_memory(client: TestClient) -> None:
    ok = 'cvgen_http_requests_total{method="POST",path="/predict",status="200"}'
    bad = 'cvgen_http_requests_total{method="POST",path="/predict",status="422"}'
    before = scrape(client, H)
    assert predict(client, {"prompt": "x", "seed": "1"}).status_code == 200
    assert predict(client, {"seed": "1"}).status_code == 422
    after = scrape(client, H)
    assert after[ok] == before.get(ok, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    # model-side metrics carry the LoRA's name (this server's one LoRA is "default")
    images = 'cvgen_images_total{keep_face="false",lora="default"}'
    batches = 'cvgen_batch_size_count{lora="default"}'
    predicts = 'cvgen_predict_seconds_count{lora="default"}'
    assert after[images] == before[images] + 1
    assert after[batches] == before[batches] + 1
    assert after[predicts] == before[predicts] + 1
    detects = 'cvgen_stage_seconds_count{stage="detect"}'
    assert after[detects] == before[detects] + 1
    key = 'cvgen_http_request_duration_seconds_count{path="/predict"}'
    assert after[key] == before[key] + 2
    assert after['cvgen_worker_resident_memory_bytes{worker="0"}'] > 10_000_000
    assert after["process_resident_memory_bytes"] > 10_000_000
    assert after["cvgen_http_requests_in_flight"] == 1  # the scrape itself
    assert after['cvgen_gpu_memory_allocated_bytes{worker="0"}'] == 0  # on CPU


def test_one_log_line_per_request_without_secrets(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cvgen.serve.access")
    r = predict(
        client, {"prompt": "secret prompt", "seed": "1"}, headers={"X-Request-ID": "req-42"}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    predict(client, {"seed": "1"}, headers={"X-Request-ID": "req-43"})
    lines = [
        json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "cvgen.serve.access"
    ]
    mine = {ln["id"]: ln for ln in lines if ln["id"] in ("req-42", "req-43")}
    assert mine["req-42"]["status"] == 200 and mine["req-42"]["batch_size"] == 1
    assert mine["req-42"]["latency_ms"] > 0
    assert mine["req-43"]["status"] == 422 and mine["req-43"]["error_field"] == "prompt"
    assert sum(1 for ln in lines if ln["id"] == "req-42") == 1
    text = caplog.text
    assert KEY not in text and "secret prompt" not in text
    assert base64.b64encode(PHOTO[:60]).decode()[:40] not in text


# --- fuzzing: no field values make a 500 ------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
_form_value = st.one_of(
    _text,
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "1", "2", "0.5", "1e309", "-0", "0x10", "1_0", "NaN", "inf"]),
)
_json_value = st.one_of(
    _form_value,
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# no URL here may reach beyond this machine: refused ranges, a closed local port, junk
_urls = st.sampled_from(
    [
        "",
        "ftp://x/y",
        "http://10.0.0.1/a",
        "http://[::1]/a",
        "http://127.0.0.1:1/a",
        "not a url",
        "http://",
    ]
)
_names = (*GenParams.model_fields, "mood")  # every request field, and one the server does not know
_images = st.one_of(st.none(), st.just(PHOTO), st.just(TRUNCATED), st.binary(max_size=64))


def _valid_or(
    value: st.SearchStrategy[Any], valid: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    return st.one_of(valid, value)  # half the time a plausible value, so requests get far


_form_fields = st.fixed_dictionaries(
    {"prompt": _valid_or(_form_value, st.just("a portrait"))},
    optional={
        **{n: _valid_or(_form_value, st.sampled_from(["1", "2", "0.5"])) for n in _names[1:]},
        "image_url": _urls,
    },
)
_json_fields = st.fixed_dictionaries(
    {"prompt": _valid_or(_json_value, st.just("a portrait"))},
    optional={
        **{n: _valid_or(_json_value, st.sampled_from([1, 2, 0.5])) for n in _names[1:]},
        "image_url": _urls,
        "image_b64": st.one_of(st.just(base64.b64encode(PHOTO).decode()), _text),
    },
)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fields=_form_fields, image=_images)
def test_fuzz_form_fields_never_500(
    client: TestClient, fields: dict[str, str], image: bytes | None
) -> None:
    r = predict(client, fields, image=image)
    assert r.status_code in (200, 400, 403, 413, 415, 422), (r.status_code, r.text)
    if r.status_code == 200:
        assert decode(r.content).size == (SIZE, SIZE)
    else:
        assert isinstance(r.json()["detail"], str)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fields=_json_fields, accept_json=st.booleans())
def test_fuzz_json_fields_never_500(
    client: TestClient, fields: dict[str, Any], accept_json: bool
) -> None:
    headers = {**H, "Accept": "application/json"} if accept_json else H
    r = client.post("/predict", json=fields, headers=headers)
    assert r.status_code in (200, 400, 403, 413, 415, 422), (r.status_code, r.text)
    if r.status_code == 200:
        assert r.headers["content-type"] == ("application/json" if accept_json else "image/jpeg")
    else:
        assert isinstance(r.json()["detail"], str)


_json_tree = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=12,
)


def _nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"prompt": "x", "steps": ' + b"[" * depth + b"]" * depth + b"}"


_raw_json = st.one_of(
    # nesting from shallow to far past the recursion limit
    st.builds(_nested, st.integers(1, 30_000), st.sampled_from(["array", "object", "field"])),
    st.sampled_from(
        [
            b"",
            b" ",
            b"null",
            b'"a string"',
            b"1e999",
            b'{"prompt": NaN, "seed": Infinity}',
            b'{"prompt": "x", "steps": -Infinity}',
            b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}",  # past int's digit limit
            b'{"prompt": "x", "strength": 1e-400, "guidance_scale": 1e400}',
            b'\xef\xbb\xbf{"prompt": "x"}',  # a UTF-8 BOM
            '{"prompt": "x", "image_b64": "AAAA"}'.encode("utf-16"),
            b'{"prompt": "x"} trailing',
            b'{"prompt": "\\ud800 lone surrogate", "image_b64": "AAAA"}',
            b'{"prompt": "x", "prompt": 5}',  # a duplicate key
            b'{"prompt": "x", "\\u0000": 1}',
            b'{"prompt": "x", "image_b64": {"a": [1, {"b": null}]}}',
            b'{"prompt": "x", "image_url": ["http://127.0.0.1/"]}',
            b"\xff\xfe\x00\x01",
        ]
    ),
    st.binary(max_size=64),
    # any JSON document, and any JSON value in any field
    _json_tree.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from([*_names, "image_b64", "image_url"]), _json_tree).map(
        lambda d: json.dumps(d).encode()
    ),
)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_raw_json)
def test_fuzz_raw_json_bodies_never_5xx(client: TestClient, body: bytes) -> None:
    headers = {**H, "content-type": "application/json"}
    r = client.post("/predict", content=body, headers=headers)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300], body[:100])
    out = r.json()
    assert set(out) == {"detail", "field"} and isinstance(out["detail"], str)


def test_server_is_healthy_after_the_fuzzing(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert predict(client, {"prompt": "still fine", "seed": "1"}).status_code == 200
