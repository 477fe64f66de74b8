"""The server's operations in-process on the tiny model: drift features of every photo (log
and score), every metric the alerts and dashboard use, ``GET /info``, ``POST /admin/reload``
of a moved W&B alias (a fake W&B API), and several workers answering."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cvgen.images import open_image
from cvgen.monitor.features import FEATURE_NAMES, feature_detector, photo_features
from cvgen.monitor.metric_names import SERVER_METRICS
from cvgen.monitor.profile import profile_from_rows
from cvgen.serve.config import ServeConfig
from cvgen.serve.server import build_server
from cvgen.serve.wandb_lora import resolve_sources, with_sources

from .conftest import make_random_lora, scrape, send_together, served
from .test_serve_ops import fake_nvml

KEY = "ops-key-0123456789"
H = {"X-API-Key": KEY}
TINY = {"device": "cpu", "default_steps": 2, "max_steps": 4, "warmup": False}


def faceless_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((80, 120, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def post(c: Any, photo: bytes, **data: str) -> Any:
    files = {"image": ("p.jpg", photo, "application/octet-stream")}
    return c.post(
        "/predict", data={"prompt": "portrait", "seed": "1", **data}, files=files, headers=H
    )


def test_every_photo_is_described_logged_and_scored_and_every_metric_is_exported(
    tiny_model: Path, tmp_path: Path, portraits: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    detector = feature_detector()
    rows = [(n, photo_features(open_image(b), detector)) for n, b in portraits.items()]
    reference = profile_from_rows(rows).save(tmp_path / "reference_profile.json")
    log = tmp_path / "logs" / "features.jsonl"
    cfg = ServeConfig(
        base=str(tiny_model),
        feature_log=str(log),
        drift_reference=str(reference),
        drift_window=10,
        drift_min_samples=3,
        **TINY,  # type: ignore[arg-type]
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(1))  # a GPU, as NVML reports it
    server = build_server(cfg, api_key=KEY)
    with served(server) as c:
        photo = next(iter(portraits.values()))
        assert post(c, photo).status_code == 200
        assert post(c, photo, keep_face="false").status_code == 200
        refused = post(c, faceless_png())  # keep_face without a face: 422, and still measured
        assert refused.status_code == 422 and refused.json()["field"] == "image"
        assert server.photos is not None
        server.photos.drain()
        text = c.get("/metrics", headers=H).text
        m = scrape(c, H)

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 3
    for r in records:  # numbers only: no photo, prompt, address or id
        assert set(r) == {"v", "time", "features"} and list(r["features"]) == list(FEATURE_NAMES)
    assert records[0]["features"]["face_count"] == 1.0 and records[2]["features"]["face_count"] == 0
    assert records[0]["features"]["brightness"] == pytest.approx(rows[0][1]["brightness"], rel=1e-5)
    assert "portrait" not in log.read_text()

    assert m['cvgen_drift_photos_total{outcome="measured"}'] == 3
    assert m['cvgen_drift_photos_total{outcome="skipped"}'] == 0
    for feature in ("brightness", "face_count", "width"):
        assert 0 <= m[f'cvgen_drift_score{{feature="{feature}"}}'] <= 1
    assert math.isnan(m['cvgen_drift_score{feature="face_x"}'])  # 2 photos of 3 had a face: < 3
    assert m["cvgen_drift_feature_seconds_count"] == 3
    assert m['cvgen_worker_up{worker="0"}'] == 1 and m["cvgen_worker_restarts_total"] == 0
    assert m["cvgen_queue_depth"] == 0
    assert m['cvgen_batch_fill_ratio_sum{lora="none"}'] == 2 * 1 / cfg.max_batch_size
    assert m['cvgen_gpu_temperature_celsius{gpu="0"}'] == 60
    model_info = f'cvgen_model_info{{base="{tiny_model}",lora="none",ref="",sha256="",version=""}}'
    assert m[model_info] == 1
    assert m['cvgen_worker_cpu_seconds_total{worker="0"}'] > 0
    # every metric the alert rules and the dashboard may use is there
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    for metric in SERVER_METRICS:
        assert metric.name in exported, metric.name
        assert any(re.search(rf"^{s}[{{ ]", text, re.M) for s in metric.series()), metric.name


def test_without_monitoring_settings_no_features_are_computed(tiny_model: Path) -> None:
    server = build_server(ServeConfig(base=str(tiny_model), **TINY))  # type: ignore[arg-type]
    assert server.photos is None and server.ingress.on_photo is None


class FakeArtifact:
    def __init__(self, version: str, weights: Path) -> None:
        self.version, self.weights, self.digest = version, weights, f"digest-of-{version}"

    def download(self, root: str) -> str:
        shutil.copy(self.weights, Path(root) / self.weights.name)
        return root


class FakeApi:
    """W&B's API: the alias ``production`` names ``current`` (``gone``: the alias is gone)."""

    def __init__(self, versions: dict[str, Path], current: str) -> None:
        self.versions, self.current = versions, current

    def artifact(self, name: str, type: str | None = None) -> FakeArtifact:
        if self.current == "gone":
            raise ValueError(f"artifact {name} not found")
        return FakeArtifact(self.current, self.versions[self.current])


def test_info_and_a_reload_that_follows_a_moved_alias(
    tiny_model: Path, tmp_path: Path, random_lora: Path
) -> None:
    v2 = make_random_lora(tiny_model, tmp_path / "v2", seed=7)
    api = FakeApi({"v1": random_lora, "v2": v2}, "v1")
    ref = "wandb://me/cvgen/cvgen-lora:production"
    cfg = ServeConfig(
        base=str(tiny_model),
        lora=ref,
        wandb_cache_dir=str(tmp_path / "cache"),
        default_keep_face=False,
        **TINY,  # type: ignore[arg-type]
    )
    sources = resolve_sources(cfg, api)
    server = build_server(
        with_sources(cfg, sources), api_key=KEY, source_cfg=cfg, sources=sources, wandb_api=api
    )
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        noise, format="PNG"
    )

    def image(c: Any) -> np.ndarray:
        files = {"image": ("p.png", noise.getvalue(), "image/png")}
        data = {"prompt": "portrait", "seed": "1"}
        r = c.post("/predict", data=data, files=files, headers={**H, "Accept": "image/png"})
        assert r.status_code == 200, r.text
        return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.int16)

    with served(server) as c:
        info = c.get("/info", headers=H).json()
        [lora] = info["loras"]
        assert (lora["name"], lora["ref"], lora["alias"], lora["version"]) == (
            "default",
            ref,
            "production",
            "v1",
        )
        assert lora["digest"] == "digest-of-v1" and len(lora["sha256"]) == 64
        assert lora["path"].endswith("/v1") and lora["default"] and lora["fused"]
        assert info["base"] == str(tiny_model) and info["cvgen"] and info["generation"] == 0
        assert info["accelerator"] == "cpu" and info["workers"] == 1 and info["ready"] == 1
        assert set(info["levers"]) >= {"attention", "compile_unet"}
        assert c.get("/info").status_code == 401
        before = image(c)

        assert c.post("/admin/reload").status_code == 401
        same = c.post("/admin/reload", headers=H)
        assert same.status_code == 200 and same.json()["reloaded"] is False

        api.current = "v2"  # cvgen promote moved the alias
        moved = c.post("/admin/reload", headers=H)
        assert moved.status_code == 200, moved.text
        body = moved.json()
        assert body["reloaded"] is True and body["info"]["loras"][0]["version"] == "v2"
        assert "was default=" in body["detail"] and body["info"]["generation"] == 1
        after = image(c)
        assert np.abs(after - before).mean() > 1  # the worker serves the new weights
        m = scrape(c, H)
        info_v2 = {k: v for k, v in m.items() if k.startswith("cvgen_model_info")}
        assert len(info_v2) == 1 and 'version="v2"' in next(iter(info_v2))

        api.current = "gone"
        failed = c.post("/admin/reload", headers=H)
        assert failed.status_code == 422 and failed.json()["field"] == "lora"
        assert "cannot resolve the W&B artifact" in failed.json()["detail"]
        assert "still serving default=" + ref + " (v2," in failed.json()["detail"]
        assert np.array_equal(image(c), after)  # still the same weights


def test_reload_needs_an_api_key_on_the_server(tiny_model: Path) -> None:
    server = build_server(ServeConfig(base=str(tiny_model), **TINY))  # type: ignore[arg-type]
    from fastapi.testclient import TestClient

    r = TestClient(server.app).post("/admin/reload")
    assert r.status_code == 403
    assert r.json() == {
        "detail": "reloading needs an API key: start the server with the variable "
        "CVGEN_API_KEY set",
        "field": None,
    }


def test_two_workers_on_cpu_both_answer(tiny_model: Path, portraits: dict[str, bytes]) -> None:
    cfg = ServeConfig(
        base=str(tiny_model),
        workers_per_device=2,
        max_batch_size=1,
        **TINY,  # type: ignore[arg-type]
    )
    server = build_server(cfg, api_key=KEY)
    assert server.workers_per_device == 2 and server.devices == ["cpu"]
    photo = next(iter(portraits.values()))
    with served(server) as c:
        info = c.get("/info", headers=H).json()
        assert (info["workers"], info["workers_per_device"], info["ready"]) == (2, 2, 2)
        for _ in range(5):
            answers = send_together(
                lambda i: post(c, photo, seed=str(i)), {str(i): i for i in range(6)}
            )
            assert all(r.status_code == 200 for r in answers.values())
            m = scrape(c, H)
            if {
                'cvgen_worker_resident_memory_bytes{worker="0"}',
                'cvgen_worker_resident_memory_bytes{worker="1"}',
            } <= m.keys():
                break
        else:
            pytest.fail(f"one worker answered everything: {m}")
        assert m['cvgen_worker_up{worker="0"}'] == m['cvgen_worker_up{worker="1"}'] == 1
