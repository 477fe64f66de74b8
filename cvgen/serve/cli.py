"""``cvgen serve``: run the HTTP server, with a supervisor that makes SIGTERM clean.

LitServe has no SIGTERM handler: SIGTERM to its main process orphans its worker processes.
So ``cvgen serve`` is a small supervisor: it checks what it can first (config, base model,
LoRA) so mistakes are one line before any worker starts, starts the server in a child process
that leads its own process group, prints one line once ``/health`` answers 200, forwards
SIGTERM/SIGINT to the child, and after ``shutdown_grace`` seconds kills whatever is left in
that group. The child turns SIGTERM into LitServe's graceful path (uvicorn stops accepting,
finishes in-flight requests, then the workers are stopped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import httpx

from cvgen.serve.config import ServeConfig, load_config
from cvgen.serve.logs import configure_logging

if TYPE_CHECKING:
    from cvgen.serve.wandb_lora import LoraSource

CHILD_ENV = "CVGEN_SERVE_CHILD_CONFIG"
CHILD_SOURCES_ENV = "CVGEN_SERVE_CHILD_LORAS"
MAIN_FLAGS = (
    "base",
    "lora",
    "host",
    "port",
    "max_batch_size",
    "batch_timeout",
    "device",
    "dtype",
    "accelerator",
    "devices",
    "workers_per_device",
)


def _devices(value: str) -> int | str:
    """``--devices``: a count, or auto (the config check names anything else)."""
    return int(value) if value.strip().isdigit() else value


def add_parser(sub: Any) -> None:
    """Register ``cvgen serve``."""
    p = sub.add_parser(
        "serve",
        help="serve img2img over HTTP (LitServe)",
        description="Serve portraits over HTTP: the web page at /, POST /predict, GET /looks, "
        "GET /loras, GET /info, POST /admin/reload, GET /health, GET /metrics, /docs. "
        "Flags override the config file. The API key comes from the environment variable named "
        "by api_key_env (default CVGEN_API_KEY).",
    )
    p.add_argument("--config", help="YAML config (configs/serve.yaml)")
    p.add_argument("--base", help="base model: diffusers folder or hub id")
    p.add_argument(
        "--lora",
        help="serve this one LoRA (file, folder, or wandb://entity/project/artifact:alias); "
        "several: loras in the config",
    )
    p.add_argument("--host", help="address to bind (0.0.0.0, 127.0.0.1 or ::)")
    p.add_argument("--port", type=int, help="port (default: $PORT, else 8080)")
    p.add_argument("--max_batch_size", type=int, help="most requests per batch")
    p.add_argument("--batch_timeout", type=float, help="seconds to wait to fill a batch")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    p.add_argument("--accelerator", help="auto, cpu, cuda, mps (LitServe's accelerator)")
    p.add_argument(
        "--devices", type=_devices, help="GPUs to serve on (a set of workers each), or auto: all"
    )
    p.add_argument(
        "--workers_per_device", type=int, help="inference processes per device (model copies)"
    )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The config file, then ``$PORT`` (Cloud Run sets it), then the flags."""
    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in MAIN_FLAGS}
    origins = {}
    port = os.environ.get("PORT", "").strip()
    if overrides["port"] is None and port:
        overrides["port"] = int(port) if port.isdigit() else port  # not digits: an error
        origins["port"] = "$PORT"
    return load_config(args.config, overrides, origins)


def run(args: argparse.Namespace) -> int:
    """Check the base model, resolve the LoRA, then supervise the server child until it exits
    or a signal comes."""
    from cvgen.pipeline import check_base
    from cvgen.serve.drift import load_reference
    from cvgen.serve.looks import load_looks
    from cvgen.serve.wandb_lora import resolve_sources

    cfg = config_from_args(args)
    check_base(cfg.base)  # fail here with the reason, not in a worker that LitServe hides
    load_looks(cfg)  # a mistake in the looks file: one line naming file and line
    load_reference(cfg)  # a missing or broken drift reference: one line
    sources = resolve_sources(cfg)  # a LoRA for another base: one line, before the child
    return supervise(cfg, sources)


def serving_line(cfg: ServeConfig) -> str:
    """The line ``cvgen serve`` prints once the server answers."""
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    loras = cfg.lora_map
    if len(loras) == 1:
        model = f"{cfg.base} + LoRA {next(iter(loras.values()))}"
    elif loras:
        model = f"{cfg.base} + LoRAs {', '.join(loras)} (default {cfg.default_lora_name})"
    else:
        model = cfg.base
    return (
        f"cvgen: serving {model} on http://{host}:{cfg.port} "
        "(page /, POST /predict; /looks, /loras, /info, /health, /metrics, /docs)"
    )


def _health_url(cfg: ServeConfig) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(cfg.host, cfg.host)
    return f"http://{host}:{cfg.port}/health"


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def supervise(cfg: ServeConfig, sources: dict[str, LoraSource] | None = None) -> int:
    """Run the server in a child process group; forward SIGTERM/SIGINT; reap the group.

    ``cfg`` is the config as given; ``sources`` what its LoRAs resolved to (the child serves
    those paths, and resolves ``cfg``'s references again on ``POST /admin/reload``)."""
    from cvgen.serve.wandb_lora import resolve_sources

    if sources is None:
        sources = resolve_sources(cfg)
    env = {
        **os.environ,
        CHILD_ENV: cfg.to_json(),
        CHILD_SOURCES_ENV: json.dumps({k: v.to_dict() for k, v in sources.items()}),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", "from cvgen.serve.cli import child_main; child_main()"],
        env=env,
        start_new_session=True,  # its own process group: everything LitServe starts is in it
    )
    stop_at: list[float] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if not stop_at:
            stop_at.append(time.monotonic() + cfg.shutdown_grace + 5)
            # only the server's main process: it drains uvicorn before stopping the workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    ready = False
    try:
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            while True:
                try:
                    code = child.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if stop_at and time.monotonic() > stop_at[0]:
                        _signal_group(child.pid, signal.SIGKILL)
                        code = child.wait()
                        break
                    if not ready and not stop_at and _healthy(client, _health_url(cfg)):
                        ready = True
                        print(serving_line(cfg), flush=True)
    finally:
        _signal_group(child.pid, signal.SIGKILL)  # anything left in the group
        for s, h in old.items():
            signal.signal(s, h)
    return 0 if stop_at and code in (0, -signal.SIGTERM, 128 + signal.SIGTERM) else code


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def child_main() -> None:
    """The server process (started by :func:`supervise`): SIGTERM -> graceful shutdown."""
    from cvgen.serve.wandb_lora import LoraSource, with_sources

    source_cfg = ServeConfig.from_json(os.environ.pop(CHILD_ENV))
    sources = {
        k: LoraSource.from_dict(v)
        for k, v in json.loads(os.environ.pop(CHILD_SOURCES_ENV, "{}")).items()
    }
    cfg = with_sources(source_cfg, sources)
    configure_logging(cfg.log_level)

    main_pid = os.getpid()

    def graceful(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            # a forked uvicorn process re-raising the signal after its own graceful drain
            raise SystemExit(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once
        raise KeyboardInterrupt  # LitServer.run's graceful-shutdown path

    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)
    from cvgen.serve.server import build_server

    server = build_server(cfg, api_key=cfg.api_key(), source_cfg=source_cfg, sources=sources)
    server.run(
        host=cfg.host,
        port=cfg.port,
        num_api_servers=1,  # one API process: /metrics counters are whole
        log_level=cfg.log_level,
        generate_client_file=False,
        access_log=False,  # cvgen.serve.access logs one JSON line per request instead
    )
    if server.exit_code:  # a worker could not be kept alive (cvgen.serve.workers)
        sys.exit(server.exit_code)
