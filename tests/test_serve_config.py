"""Serve config errors that point at their source, and base models that are neither a folder nor a
hub model this machine can get: one line each, before any server starts."""

from __future__ import annotations

import argparse
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvgen.cli import main
from cvgen.errors import CVGenError
from cvgen.pipeline import check_base
from cvgen.serve.cli import config_from_args
from cvgen.serve.config import ServeConfig, load_config

# --- config errors: one line, the key, and where it came from ------------------------------


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("port: 9000\nmax_batch_size: 0\n", 2, "max_batch_size must be >= 1, got 0"),
        ("port: high\n", 1, "port must be an integer, got 'high'"),
        ("port: 80\n", 1, "port must be >= 1024, got 80"),
        ("max_batch_size: 2.5\n", 1, "max_batch_size must be an integer, got 2.5"),
        ("fuse_lora: 1\n", 1, "fuse_lora must be true or false, got 1"),
        ("# a comment\nmax_batchsize: 2\n", 2, "unknown key max_batchsize (did you mean"),
        ("host: localhost\n", 1, "host must be '0.0.0.0', '127.0.0.1' or '::'"),
        ("dtype: fp8\n", 1, "dtype must be auto or one of float32"),
        ("url_allowlist: [10.0.0.0/8, nope]\n", 1, "url_allowlist entry 'nope' is not an IP"),
        ("levers:\n  channels_last: true\n  attention: xformers\n", 3, "levers.attention must be"),
        ("levers:\n  compile_mode: fastest\n", 2, "levers.compile_mode must be one of"),
        ("levers:\n  channels_last: 1\n", 2, "levers.channels_last must be true or false"),
        ("levers:\n  flush: true\n", 2, "unknown key levers.flush"),
        ("levers: [channels_last]\n", 1, "levers must be a mapping"),
        ("max_steps: 10\n", 1, "default_steps must be <= max_steps (10), got 30"),
        (
            "default_steps: 1\ndefault_strength: 0.5\n",
            1,
            "default_steps x default_strength must be",
        ),
        ("port: [1\n", 2, "not valid YAML"),
        ("devices: 0\n", 1, "devices must be a number of devices >= 1 or auto, got 0"),
        ("devices: all\n", 1, "devices must be a number of devices >= 1 or auto, got 'all'"),
        ("workers_per_device: 0\n", 1, "workers_per_device must be >= 1, got 0"),
        ("accelerator: tpu\n", 1, "accelerator must be 'auto', 'cpu', 'cuda' or 'mps'"),
        ("device: cpu\ndevices: 2\n", 2, "devices must be 1 on CPU (one device; more processes"),
        ("device: cuda:1\ndevices: 2\n", 2, "devices must be 1 when device names one GPU"),
        ("drift_window: 10\ndrift_min_samples: 20\n", 2, "drift_min_samples must be <="),
    ],
)
def test_config_errors_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    with pytest.raises(CVGenError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:{line}: {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_cli_config_errors_name_the_flag_or_port_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text("port: 9000\n")
    assert main(["serve", "--config", str(p), "--max_batch_size", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "cvgen: error: --max_batch_size: max_batch_size must be >= 1, got 0\n"
    monkeypatch.setenv("PORT", "http")
    assert main(["serve", "--config", str(p)]) == 2
    assert capsys.readouterr().err == ("cvgen: error: $PORT: port must be an integer, got 'http'\n")


def test_port_precedence_file_then_port_variable_then_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text("port: 9000\n")

    def port(flag: int | None) -> int:
        args = argparse.Namespace(config=str(p), port=flag)
        return config_from_args(args).port

    monkeypatch.delenv("PORT", raising=False)
    assert port(None) == 9000
    monkeypatch.setenv("PORT", "9100")
    assert port(None) == 9100
    assert port(9200) == 9200


def test_config_round_trips_and_derives_once() -> None:
    cfg = ServeConfig(base="models/none", lora="l.safetensors", lora_scale=0.5)
    assert ServeConfig.from_json(cfg.to_json()) == cfg
    assert (cfg.fixed_lora_scale, cfg.default_lora_scale, cfg.image_size) == (0.5, 0.5, 512)
    unfused = cfg.model_copy(update={"fuse_lora": False})
    assert (unfused.fixed_lora_scale, unfused.default_lora_scale) == (None, 0.5)
    bare = ServeConfig(resolution=256)
    assert (bare.fixed_lora_scale, bare.default_lora_scale, bare.image_size) == (None, 0.0, 256)


# --- base models: a folder, or a hub model in the cache or on a reachable hub ---------------


def _cache_with(root: Path, repo_id: str) -> None:
    """A Hugging Face hub cache holding ``repo_id`` (the layout huggingface_hub writes)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")


def test_hub_id_offline_passes_only_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _cache_with(tmp_path, "org/cached")
    check_base("org/cached")
    with pytest.raises(CVGenError) as e:
        check_base("models/tny")
    assert str(e.value) == (
        "base model 'models/tny': no such folder, and not a hub model in the Hugging Face "
        "cache (HF_HUB_OFFLINE=1, so the hub was not asked); check the path"
    )
    with pytest.raises(CVGenError, match="not a hub id either"):
        check_base("no such model!")
    with pytest.raises(CVGenError, match="not a diffusers Stable Diffusion folder"):
        check_base("./models/tny")  # a path by its look: never a hub id


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers the hub's model-info API: ``org/known`` exists, nothing else does."""

    def do_GET(self) -> None:
        known = self.path.startswith("/api/models/org/known")
        body = json.dumps({"id": "org/known"} if known else {"error": "not found"}).encode()
        self.send_response(200 if known else 404)
        if not known:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """huggingface_hub online, with an empty cache, pointed at a local fake hub."""
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield constants
    server.shutdown()
    server.server_close()


def test_hub_id_online_asks_the_hub(hub: Any) -> None:
    check_base("org/known")
    with pytest.raises(CVGenError) as e:
        check_base("models/tny")
    assert "no such folder, and no model of that id on the Hugging Face hub" in str(e.value)


def test_hub_id_with_the_hub_unreachable(hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(CVGenError) as e:
        check_base("models/tny")
    assert "not a hub model in the Hugging Face cache, and the hub is unreachable" in str(e.value)


def test_worker_settings_come_from_file_and_flags(tmp_path: Path) -> None:
    from cvgen.serve.server import build_server

    p = tmp_path / "serve.yaml"
    p.write_text("device: cpu\nworkers_per_device: 3\n")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    from cvgen.serve.cli import add_parser

    add_parser(sub)
    args = parser.parse_args(["serve", "--config", str(p), "--workers_per_device", "2"])
    cfg = config_from_args(args)
    assert (cfg.workers_per_device, cfg.devices, cfg.litserve_accelerator) == (2, 1, "cpu")
    assert parser.parse_args(["serve", "--devices", "auto"]).devices == "auto"
    assert parser.parse_args(["serve", "--devices", "2"]).devices == 2
    server = build_server(cfg)  # what LitServer was given
    assert (server.workers_per_device, server.devices) == (2, ["cpu"])
    assert len(server._inference_workers_config_for_api("/predict")) == 2
