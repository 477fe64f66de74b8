"""The portrait server in-process: keep_face, framing, looks and two LoRAs behind one server, on
the tiny model and the sample portraits (``wrap_litserve_start`` + TestClient)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cvgen import portrait
from cvgen.images import open_image, psnr
from cvgen.serve.config import ServeConfig
from cvgen.serve.schema import NO_FACE
from cvgen.serve.server import build_server

from .conftest import scrape, send_together, served

PNG = {"Accept": "image/png"}  # lossless answers: pixels can be compared exactly
DETECTOR = portrait.face_detector()


@pytest.fixture(scope="module")
def client(tiny_model: Path, two_loras: dict[str, Path]) -> Iterator[TestClient]:
    cfg = ServeConfig(
        base=str(tiny_model),
        loras={name: str(path) for name, path in two_loras.items()},
        device="cpu",
        max_batch_size=4,
        batch_timeout=0.5,
        default_steps=4,
        default_strength=0.5,
    )
    assert cfg.default_keep_face and cfg.default_framing == "square"  # the shipped defaults
    with served(build_server(cfg, api_key=None)) as c:
        yield c


def predict(c: TestClient, photo: bytes, headers: dict[str, str] | None = None, **data: Any):
    files = {"image": ("photo.jpg", photo, "image/jpeg")}
    fields = {k: str(v) for k, v in data.items()}
    return c.post("/predict", data=fields, files=files, headers=headers or PNG)


def pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.float32)


def framed(photo: bytes, size: tuple[int, int]) -> portrait.Framed:
    """The photo framed as the server frames it (same detector, same framing)."""
    img = open_image(photo)
    return portrait.frame_photo(img, DETECTOR.detect(img), size, face_fraction=0.35)


def box(header: str) -> tuple[int, ...]:
    return tuple(int(v) for v in header.split(","))


def test_keep_face_keeps_the_face_pixels_and_says_which_box(
    client: TestClient, portraits: dict[str, bytes]
) -> None:
    for name, photo in portraits.items():
        r = predict(client, photo, look="corporate", seed=1)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        want = framed(photo, (64, 64))
        assert want.face is not None
        face = want.face
        assert box(r.headers["x-face-box"]) == (face.x, face.y, face.w, face.h), name
        assert r.headers["x-faces-found"] == "1"
        got = Image.open(io.BytesIO(r.content)).convert("RGB")
        region = portrait.face_region(got.size, face)
        assert psnr(got, want.image, region) == float("inf"), name  # >= 35 dB
        keep = portrait.keep_mask(got.size, face)
        assert np.abs(pixels(r.content) - np.asarray(want.image))[keep == 0].mean() > 10, name
        stages = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
        assert set(stages) == {"detect", "mask", "generate", "composite"}
        # the JSON answer names the same box
        j = client.post(
            "/predict",
            data={"look": "corporate", "seed": "1"},
            files={"image": ("p.jpg", photo, "image/jpeg")},
            headers={"Accept": "application/json"},
        ).json()
        assert j["face_box"] == {"x": face.x, "y": face.y, "w": face.w, "h": face.h}
        assert j["faces_found"] == 1 and j["parameters"]["keep_face"] is True
        assert Image.open(io.BytesIO(base64.b64decode(j["image_b64"]))).size == (64, 64)


def test_no_face_is_a_422_naming_the_image_unless_keep_face_is_off(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), np.uint8)).save(buf, format="JPEG")
    r = predict(client, buf.getvalue(), prompt="portrait")
    assert r.status_code == 422
    assert r.json() == {"detail": f"image: {NO_FACE}", "field": "image"}
    assert NO_FACE == "no face found in the photo; send a photo with a face, or keep_face=false"
    ok = predict(client, buf.getvalue(), prompt="portrait", keep_face="false", framing="4:5")
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-faces-found"] == "0" and "x-face-box" not in ok.headers
    assert Image.open(io.BytesIO(ok.content)).size == (52, 64)  # the old centre crop


def test_several_faces_the_largest_is_kept_and_named(
    client: TestClient, portraits: dict[str, bytes]
) -> None:
    hopper, collins = (open_image(portraits[n]) for n in ("hopper", "collins"))
    group = Image.new("RGB", (900, 600), (200, 200, 200))
    group.paste(collins.resize((300, 300)), (0, 150))  # the smaller face
    group.paste(hopper, (388, 0))  # the larger face
    buf = io.BytesIO()
    group.save(buf, format="PNG")
    faces = DETECTOR.detect(group)
    assert len(faces) == 2 and faces[0].x > 388  # the larger is Hopper's
    r = predict(client, buf.getvalue(), look="studio-white", seed=2)
    assert r.status_code == 200, r.text
    assert r.headers["x-faces-found"] == "2"
    want = framed(buf.getvalue(), (64, 64))
    assert want.face is not None
    assert box(r.headers["x-face-box"]) == (want.face.x, want.face.y, want.face.w, want.face.h)
    # framed on the largest face: it fills face_fraction of the frame
    assert 0.3 < want.face.h / 64 < 0.45
    region = portrait.face_region((64, 64), want.face)
    got = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert psnr(got, want.image, region) == float("inf")


@pytest.mark.parametrize(
    "framing, size",
    [("square", (64, 64)), ("4:5", (52, 64)), ("3:4", (48, 64)), ("35x45", (50, 64))],
)
def test_framing_sizes(
    client: TestClient, portraits: dict[str, bytes], framing: str, size: tuple[int, int]
) -> None:
    r = predict(client, portraits["hopper"], prompt="portrait", framing=framing, seed=1)
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == size
    assert json.loads(r.headers["x-parameters"])["framing"] == framing
    want = framed(portraits["hopper"], size)
    assert want.face is not None
    assert box(r.headers["x-face-box"]) == (want.face.x, want.face.y, want.face.w, want.face.h)


def test_bad_framing_is_a_422(client: TestClient, portraits: dict[str, bytes]) -> None:
    r = predict(client, portraits["hopper"], prompt="portrait", framing="16:9")
    assert r.status_code == 422 and r.json()["field"] == "framing"
    assert "'35x45'" in r.json()["detail"]


def test_looks_list_defaults_and_overrides(client: TestClient, portraits: dict[str, bytes]) -> None:
    listed = client.get("/looks").json()["looks"]
    by_name = {look["name"]: look for look in listed}
    assert {"corporate", "studio-white", "outdoor", "creative-dark", "id-photo"} <= set(by_name)
    assert all(look["description"] and look["prompt"] for look in listed)
    idp = by_name["id-photo"]
    r = predict(client, portraits["collins"], look="id-photo", seed=3)
    assert r.status_code == 200, r.text
    params = json.loads(r.headers["x-parameters"])
    assert (params["look"], params["strength"], params["guidance_scale"], params["framing"]) == (
        "id-photo",
        idp["strength"],
        idp["guidance_scale"],
        "35x45",
    )
    assert Image.open(io.BytesIO(r.content)).size == (50, 64)
    # explicit fields win over the look's
    r = predict(
        client, portraits["collins"], look="id-photo", seed=3, strength=0.75, framing="square"
    )
    params = json.loads(r.headers["x-parameters"])
    assert (params["strength"], params["framing"], params["guidance_scale"]) == (
        0.75,
        "square",
        idp["guidance_scale"],
    )
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    bad = predict(client, portraits["collins"], look="boardroom")
    assert bad.status_code == 422 and bad.json()["field"] == "look"
    assert (
        "known: corporate, creative-dark, id-photo, outdoor, studio-white" in bad.json()["detail"]
    )


def test_loras_are_listed_with_what_they_were_trained_on(client: TestClient) -> None:
    loras = client.get("/loras").json()["loras"]
    assert [(x["name"], x["default"], x["fused"]) for x in loras] == [
        ("grey", True, False),
        ("warm", False, False),
    ]
    assert [x["trained"]["data_version"] for x in loras] == ["v1", "v2"]
    assert all(x["trained"]["base"] for x in loras)


def test_unknown_lora_is_a_422_listing_the_known(
    client: TestClient, portraits: dict[str, bytes]
) -> None:
    r = predict(client, portraits["hopper"], prompt="x", lora="blue")
    assert r.status_code == 422
    assert r.json() == {
        "detail": "lora: unknown LoRA 'blue'; this server has: grey, warm",
        "field": "lora",
    }


def test_a_concurrent_mix_of_loras_gets_each_request_its_own_loras_image(
    client: TestClient, portraits: dict[str, bytes]
) -> None:
    photo = portraits["collins"]
    jobs = {
        f"{lora}-{seed}": {"lora": lora, "seed": seed}
        for seed in (7, 8)
        for lora in ("grey", "warm")
    }

    def send(job: dict[str, Any]) -> Any:
        return predict(client, photo, look="outdoor", **job)

    alone = {k: send(job) for k, job in jobs.items()}
    assert all(r.status_code == 200 for r in alone.values())
    again = send(jobs["warm-7"])
    assert again.content == alone["warm-7"].content  # each LoRA is deterministic
    solo = {k: pixels(r.content) for k, r in alone.items()}
    assert np.abs(solo["grey-7"] - solo["warm-7"]).mean() > 5  # the LoRAs differ
    before = scrape(client)
    for _attempt in range(3):  # bounded: a busy machine may miss the batch window once
        results = send_together(send, jobs)
        assert all(results[k].status_code == 200 for k in jobs), results
        if all(r.headers["x-batch-size"] == "2" for r in results.values()):
            break  # one batch of 4, run as one pipeline call per LoRA
    assert all(r.headers["x-batch-size"] == "2" for r in results.values())
    for key, r in results.items():
        lora, seed = key.split("-")
        assert json.loads(r.headers["x-parameters"])["lora"] == lora
        got, other = pixels(r.content), solo[f"{'warm' if lora == 'grey' else 'grey'}-{seed}"]
        # the same request sent alone, up to what batched float maths changes (a level or two)
        assert np.abs(got - solo[key]).max() <= 2, key
        assert np.abs(got - other).mean() > 5, key
    after = scrape(client)
    for lora in ("grey", "warm"):
        images = f'cvgen_images_total{{keep_face="true",lora="{lora}"}}'
        assert after[images] - before.get(images, 0) == 2, lora
        assert f'cvgen_predict_seconds_count{{lora="{lora}"}}' in after
