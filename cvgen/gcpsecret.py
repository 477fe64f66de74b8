"""Read a Google Secret Manager secret with the machine's service account.

``python -m cvgen.gcpsecret NAME`` prints the secret; the training image's entrypoint uses it
for ``WANDB_API_KEY_SECRET`` on Vertex AI, whose job specs have no field that takes a secret
(Cloud Run's ``secretKeyRef`` does, and the serving image needs nothing of this).

``NAME`` is a version (``projects/P/secrets/S/versions/latest``), a secret
(``projects/P/secrets/S``: its latest version) or a bare secret id (in the machine's project).
The access token and the project come from the metadata server that Compute Engine and Vertex
AI give every VM and job (``GCE_METADATA_HOST`` overrides its address, as for Google's client
libraries); the secret from Secret Manager's REST API. Standard library only: no Google client
library in the image. The secret is printed and never logged; errors are one line without it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from cvgen.errors import CVGenError

API = "https://secretmanager.googleapis.com/v1"
METADATA_HOST = "metadata.google.internal"
_SECRET_ID = re.compile(r"^[\w-]+$")
_RESOURCE = re.compile(r"^projects/[^/]+/secrets/[\w-]+(/versions/[\w-]+)?$")


def _get(
    url: str, headers: dict[str, str], timeout: float, what: str, proxies: bool = True
) -> bytes:
    request = urllib.request.Request(url, headers=headers)
    # the metadata server is link-local: never through a proxy from the environment
    opener = urllib.request.build_opener(*([] if proxies else [urllib.request.ProxyHandler({})]))
    try:
        with opener.open(request, timeout=timeout) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as e:
        raise CVGenError(f"{what}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CVGenError(f"{what}: {getattr(e, 'reason', e)}") from None


def _metadata(path: str, host: str, timeout: float) -> bytes:
    return _get(
        f"http://{host}/computeMetadata/v1/{path}",
        {"Metadata-Flavor": "Google"},
        timeout,
        f"metadata server {host} (not on Google Cloud?)",
        proxies=False,
    )


def version_name(name: str, host: str, timeout: float) -> str:
    """The full version resource name for ``name`` (see the module docstring)."""
    if _SECRET_ID.match(name):
        project = _metadata("project/project-id", host, timeout).decode().strip()
        return f"projects/{project}/secrets/{name}/versions/latest"
    if not _RESOURCE.match(name):
        raise CVGenError(
            f"{name!r} is not a secret: projects/P/secrets/S[/versions/V] or a secret id"
        )
    return name if "/versions/" in name else f"{name}/versions/latest"


def access_secret(
    name: str, metadata_host: str | None = None, api: str = API, timeout: float = 10.0
) -> str:
    """The secret's value (UTF-8), read with the metadata server's access token."""
    host = metadata_host or os.environ.get("GCE_METADATA_HOST") or METADATA_HOST
    full = version_name(name, host, timeout)
    token: Any = json.loads(
        _metadata("instance/service-accounts/default/token", host, timeout) or b"{}"
    )
    if not isinstance(token, dict) or "access_token" not in token:
        raise CVGenError(f"metadata server {host}: no access token in its answer")
    body = _get(
        f"{api}/{full}:access",
        {"Authorization": f"Bearer {token['access_token']}"},
        timeout,
        f"Secret Manager {full}",
    )
    try:
        data = json.loads(body)["payload"]["data"]
        return base64.b64decode(data).decode("utf-8")
    except (ValueError, KeyError, TypeError) as e:
        raise CVGenError(f"Secret Manager {full}: unexpected answer ({type(e).__name__})") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cvgen.gcpsecret NAME``: print the secret (exit 2 and one line on error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m cvgen.gcpsecret projects/P/secrets/S[/versions/V]", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(access_secret(args[0]))
    except CVGenError as e:
        print(f"cvgen.gcpsecret: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
