"""Serving pieces without a model: config, request validation, SSRF-safe fetch, wandb:// LoRAs."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from cvgen.accel import ServeLevers
from cvgen.errors import CVGenError
from cvgen.lora import DIFFUSERS_WEIGHT_NAME
from cvgen.netfetch import (
    FetchError,
    address_allowed,
    fetch_image_bytes,
    fetch_image_bytes_sync,
    parse_networks,
)
from cvgen.serve.config import ServeConfig, load_config
from cvgen.serve.schema import ClientError, GenParams, check_image_sources
from cvgen.serve.wandb_lora import parse_ref, resolve_lora

# --- config -----------------------------------------------------------------------------


def test_shipped_serve_config_parses(repo_root: Path) -> None:
    cfg = load_config(repo_root / "configs" / "serve.yaml")
    assert cfg.port == 8080 and cfg.api_key_env == "CVGEN_API_KEY"


def test_every_config_key_has_a_comment(repo_root: Path) -> None:
    lines = (repo_root / "configs" / "serve.yaml").read_text().splitlines()
    keyed = [ln for ln in lines if ln and not ln.startswith("#") and ":" in ln]
    assert keyed and all("#" in ln for ln in keyed), [ln for ln in keyed if "#" not in ln]
    keys = {ln.split(":", 1)[0].strip() for ln in keyed}
    assert keys == set(ServeConfig.model_fields) | set(ServeLevers.__dataclass_fields__)


def test_config_flags_override_yaml(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("port: 9000\nmax_batch_size: 2\n")
    cfg = load_config(p, {"port": 9100, "lora": None})
    assert (cfg.port, cfg.max_batch_size, cfg.lora) == (9100, 2, None)


@pytest.mark.parametrize(
    "text, word",
    [
        ("nope: 1\n", "nope"),
        ("port: high\n", "port"),
        ("max_batch_size: 0\n", "max_batch_size"),
        ("url_allowlist: [not-a-net]\n", "url_allowlist"),
        ("- a list\n", "mapping"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, word: str) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(CVGenError, match=word):
        load_config(p)


# --- request fields ---------------------------------------------------------------------

CFG = ServeConfig(max_steps=10, default_steps=4, default_strength=0.5)
FUSED = CFG.model_copy(update={"lora": "lora.safetensors"})  # fused at scale 1.0
UNFUSED = FUSED.model_copy(update={"fuse_lora": False})


def test_params_defaults_and_random_seed() -> None:
    a = GenParams.parse({"prompt": " hi "}, CFG)
    b = GenParams.parse({"prompt": "hi"}, CFG)
    assert (a.prompt, a.steps, a.strength, a.lora_scale) == ("hi", 4, 0.5, 0.0)
    assert 0 <= a.seed < 2**32 and a.seed != b.seed  # 1 in 4e9 to collide


def test_params_parse_form_strings() -> None:
    p = GenParams.parse(
        {"prompt": "x", "steps": "6", "strength": "0.25", "seed": "12", "guidance_scale": "3"},
        CFG,
    )
    assert (p.steps, p.strength, p.seed, p.guidance_scale) == (6, 0.25, 12, 3.0)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({}, "prompt"),
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"prompt": "x", "strength": "0"}, "strength"),
        ({"prompt": "x", "strength": "nan"}, "strength"),
        ({"prompt": "x", "strength": 10**400}, "strength"),
        ({"prompt": "x", "strength": True}, "strength"),
        ({"prompt": "x", "steps": "2.5"}, "steps"),
        ({"prompt": "x", "steps": 11}, "steps"),
        ({"prompt": "x", "steps": 1, "strength": 0.5}, "steps"),  # 0 effective steps
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**32}, "seed"),
        ({"prompt": "x", "lora_scale": 1}, "lora_scale"),  # no LoRA loaded
        ({"prompt": "x", "colour": "red"}, "colour"),
    ],
)
def test_params_errors_name_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ClientError) as e:
        GenParams.parse(fields, CFG)
    assert e.value.status == 422 and e.value.field == field


def test_fused_lora_scale_is_fixed() -> None:
    ok = GenParams.parse({"prompt": "x", "lora_scale": "1.0"}, FUSED)
    assert ok.lora_scale == 1.0
    with pytest.raises(ClientError, match="fused"):
        GenParams.parse({"prompt": "x", "lora_scale": "0.5"}, FUSED)
    free = GenParams.parse({"prompt": "x", "lora_scale": "0.5"}, UNFUSED)
    assert free.lora_scale == 0.5


def test_image_sources_exactly_one() -> None:
    assert check_image_sources({"image": True}) == "image"
    with pytest.raises(ClientError) as e:
        check_image_sources({})
    assert e.value.field == "image"
    with pytest.raises(ClientError) as e:
        check_image_sources({"image": True, "image_url": True})
    assert e.value.field == "image_url"


# --- SSRF-safe fetch --------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip, allowed",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),  # AWS metadata over IPv6
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("224.0.0.1", False),
    ],
)
def test_address_policy(ip: str, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(ip), []) is allowed


def test_allowlist_opens_a_private_range() -> None:
    nets = parse_networks(["10.0.0.0/8"])
    assert address_allowed(ipaddress.ip_address("10.1.2.3"), nets)
    assert not address_allowed(ipaddress.ip_address("192.168.1.1"), nets)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}

    def do_GET(self) -> None:
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def local_http() -> Iterator[str]:
    """A small HTTP server on 127.0.0.1 (a loopback address: refused unless allowlisted)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    _Handler.routes = {
        "/img": (200, {"Content-Type": "image/jpeg"}, b"x" * 100),
        "/big": (200, {}, b"x" * 5000),
        "/hop": (302, {"Location": "/img"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield base
    server.shutdown()
    server.server_close()


def _fetch(url: str, allow: list[str], **kw: Any) -> bytes:
    return asyncio.run(fetch_image_bytes(url, parse_networks(allow), timeout=5, **kw))


def test_fetch_refuses_loopback_without_allowlist(local_http: str) -> None:
    with pytest.raises(FetchError) as e:
        _fetch(local_http + "/img", [])
    assert e.value.reason == "blocked_address" and "127.0.0.1" in e.value.message


def test_fetch_with_allowlist_and_redirect(local_http: str) -> None:
    assert _fetch(local_http + "/img", ["127.0.0.1/32"]) == b"x" * 100
    assert _fetch(local_http + "/hop", ["127.0.0.1/32"]) == b"x" * 100


def test_fetch_rechecks_every_redirect(local_http: str) -> None:
    with pytest.raises(FetchError, match=r"169\.254\.169\.254") as e:
        _fetch(local_http + "/to-metadata", ["127.0.0.1/32"])
    assert e.value.reason == "blocked_address"
    with pytest.raises(FetchError, match="redirects") as e:
        _fetch(local_http + "/loop", ["127.0.0.1/32"], max_redirects=2)
    assert e.value.reason == "too_many_redirects"


def test_fetch_caps_size_and_status(local_http: str) -> None:
    with pytest.raises(FetchError, match="larger than 1000") as e:
        _fetch(local_http + "/big", ["127.0.0.1/32"], max_bytes=1000)
    assert e.value.reason == "too_large"
    with pytest.raises(FetchError, match="404") as e:
        _fetch(local_http + "/missing", ["127.0.0.1/32"])
    assert e.value.reason == "http_404" and not e.value.transient


def test_fetch_sync_entry_point(local_http: str) -> None:
    """The thread-friendly wrapper runs the same checks (prepare's worker pool uses it)."""
    nets = parse_networks(["127.0.0.1/32"])
    assert fetch_image_bytes_sync(local_http + "/hop", nets, timeout=5) == b"x" * 100
    with pytest.raises(FetchError) as e:
        fetch_image_bytes_sync(local_http + "/img", [], timeout=5)
    assert e.value.reason == "blocked_address"


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "http://user:pw@8.8.8.8/", "http://"]
)
def test_fetch_refuses_bad_urls(url: str) -> None:
    with pytest.raises(FetchError) as e:
        _fetch(url, [])
    assert e.value.reason == "bad_url"


def test_parse_networks_names_the_bad_entry() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not an IP network"):
        parse_networks(["10.0.0.0/8", "10.0.0.0/33"])


# --- wandb:// LoRA references (a fake W&B API: no network) -------------------------------


class FakeArtifact:
    def __init__(self, version: str, log: list[str]) -> None:
        self.version = version
        self.log = log

    def download(self, root: str) -> str:
        self.log.append(f"download {self.version}")
        Path(root, DIFFUSERS_WEIGHT_NAME).write_bytes(b"weights " + self.version.encode())
        return root


class FakeApi:
    def __init__(self, version: str) -> None:
        self.version = version
        self.log: list[str] = []

    def artifact(self, name: str, type: str | None = None) -> FakeArtifact:
        self.log.append(f"artifact {name} {type}")
        if "missing" in name:
            raise ValueError("artifact not found")
        return FakeArtifact(self.version, self.log)


def test_wandb_ref_parsing() -> None:
    assert parse_ref("wandb://me/cvgen/portrait-lora:staging") == (
        "me",
        "cvgen",
        "portrait-lora",
        "staging",
    )
    assert parse_ref("wandb://me/cvgen/portrait-lora")[3] == "latest"
    with pytest.raises(CVGenError):
        parse_ref("wandb://me/only-two")


def test_wandb_lora_is_downloaded_once_per_version(tmp_path: Path) -> None:
    api = FakeApi("v3")
    path = resolve_lora("wandb://me/cvgen/lora:staging", tmp_path, api=api)
    assert path is not None
    assert Path(path) == tmp_path / "me" / "cvgen" / "lora" / "v3"
    assert (Path(path) / DIFFUSERS_WEIGHT_NAME).read_bytes() == b"weights v3"
    assert resolve_lora("wandb://me/cvgen/lora:staging", tmp_path, api=api) == path
    assert api.log.count("download v3") == 1  # the second call hit the cache
    assert "artifact me/cvgen/lora:staging lora" in api.log
    api.version = "v4"  # the alias moved
    newer = resolve_lora("wandb://me/cvgen/lora:staging", tmp_path, api=api)
    assert newer is not None and newer.endswith("v4") and api.log.count("download v4") == 1


def test_wandb_lora_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(CVGenError, match="cannot resolve"):
        resolve_lora("wandb://me/cvgen/missing:latest", tmp_path, api=FakeApi("v1"))
    with pytest.raises(CVGenError, match="no such LoRA"):
        resolve_lora(str(tmp_path / "nope.safetensors"), tmp_path)


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/predict", "/predict"),
        ("/", "/"),
        ("/docs", "/docs"),
        ("/static/page.js", "/static"),
        ("/static/a/b.css", "/static"),
        ("/wp-admin/setup.php", "other"),
    ],
)
def test_metrics_path_labels_are_bounded(path: str, label: str) -> None:
    """Request metrics label known routes by name, the page's files as one label and anything
    else as "other": a scanner's paths cannot grow the label set."""
    from cvgen.serve.metrics import ServeMetrics

    assert ServeMetrics.path_label(path) == label
