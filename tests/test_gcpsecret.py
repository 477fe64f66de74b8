"""cvgen.gcpsecret against a local stand-in for the metadata server and Secret Manager."""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from cvgen.errors import CVGenError
from cvgen.gcpsecret import access_secret

SECRET = "wandb-key-0123456789"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/computeMetadata/v1/"):
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._send(403, b"missing Metadata-Flavor")
            if self.path.endswith("/project/project-id"):
                return self._send(200, b"my-project")
            if self.path.endswith("/service-accounts/default/token"):
                return self._send(200, json.dumps({"access_token": "tok"}).encode())
        if self.path == "/v1/projects/my-project/secrets/wandb/versions/latest:access":
            if self.headers.get("Authorization") != "Bearer tok":
                return self._send(401, b"no")
            data = base64.b64encode(SECRET.encode()).decode()
            return self._send(200, json.dumps({"payload": {"data": data}}).encode())
        return self._send(404, b"not found")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


@pytest.mark.parametrize(
    "name",
    [
        "projects/my-project/secrets/wandb/versions/latest",
        "projects/my-project/secrets/wandb",
        "wandb",  # the project from the metadata server
    ],
)
def test_reads_the_secret_with_the_service_account_token(server: str, name: str) -> None:
    assert access_secret(name, metadata_host=server, api=f"http://{server}/v1") == SECRET


def test_errors_are_one_line_and_never_hold_the_secret(server: str) -> None:
    api = f"http://{server}/v1"
    with pytest.raises(CVGenError, match="HTTP 404") as info:
        access_secret("projects/my-project/secrets/other", metadata_host=server, api=api)
    assert SECRET not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CVGenError, match="is not a secret"):
        access_secret("projects/x/buckets/y", metadata_host=server, api=api)


def test_command_line_prints_the_secret_or_one_line(server: str) -> None:
    env = {**os.environ, "GCE_METADATA_HOST": "127.0.0.1:9"}  # nothing listens there
    out = subprocess.run(
        [sys.executable, "-m", "cvgen.gcpsecret", "wandb"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("cvgen.gcpsecret: error: metadata server 127.0.0.1:9")
    assert len(out.stderr.strip().splitlines()) == 1
