"""Fetching photos over HTTP(S) with httpx: timeouts, retries with backoff, a size cap,
content-type and magic-byte checks. One shared client; callers bound the concurrency
(``cvgen.data.prepare`` runs rows in a thread pool)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import httpx

# leading bytes of the image formats cvgen accepts
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
# responses worth another try; other 4xx are final
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class FetchError(Exception):
    """A photo could not be fetched; ``reason`` is a short code for the rejection report."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def sniff_image(data: bytes) -> str | None:
    """The image format named by the first bytes of ``data``, or ``None``."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def check_image_bytes(data: bytes, where: str) -> None:
    """Raise :class:`FetchError` for empty bytes or bytes that do not start like an image."""
    if not data:
        raise FetchError("empty_file", f"{where}: zero bytes")
    if sniff_image(data) is None:
        raise FetchError(
            "not_an_image", f"{where}: does not start like a JPEG/PNG/WebP/GIF/BMP/TIFF"
        )


@dataclass
class HttpConfig:
    """How photos are fetched.

    Args:
        connect_timeout: seconds to connect.
        read_timeout: seconds to wait for each piece of the response.
        retries: further attempts after a timeout, a connection error or a 408/429/5xx.
        backoff: first wait between attempts in seconds; doubles each time (with jitter).
        max_bytes: largest accepted response body.
        user_agent: the User-Agent header.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.5
    max_bytes: int = 30 * 1024 * 1024
    user_agent: str = "cvgen-data-prepare/0.1 (+https://github.com/)"


def make_client(cfg: HttpConfig, max_connections: int = 8) -> httpx.Client:
    """An httpx client (thread-safe) with ``cfg``'s timeouts and a bounded connection pool."""
    return httpx.Client(
        timeout=httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        follow_redirects=True,
        headers={"User-Agent": cfg.user_agent, "Accept": "image/*"},
    )


def _fetch_once(client: httpx.Client, url: str, cfg: HttpConfig) -> bytes:
    with client.stream("GET", url) as resp:
        if resp.status_code >= 400:
            raise FetchError(f"http_{resp.status_code}", f"{url}: HTTP {resp.status_code}")
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and not ctype.startswith("image/") and ctype != "application/octet-stream":
            raise FetchError("bad_content_type", f"{url}: content-type {ctype!r} is not an image")
        length = resp.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.max_bytes:
            raise FetchError("too_large", f"{url}: {length} bytes is over the {cfg.max_bytes} cap")
        chunks: list[bytes] = []
        total = 0
        for chunk in resp.iter_bytes():
            total += len(chunk)
            if total > cfg.max_bytes:
                raise FetchError("too_large", f"{url}: over the {cfg.max_bytes}-byte cap")
            chunks.append(chunk)
    data = b"".join(chunks)
    check_image_bytes(data, url)
    return data


def fetch(client: httpx.Client, url: str, cfg: HttpConfig) -> bytes:
    """The body of ``url``, checked to be an image. Retries timeouts, connection errors and
    408/429/5xx answers with exponential backoff; raises :class:`FetchError` with a reason
    code (``http_404``, ``timeout``, ``connection_error``, ``too_large``, ...)."""
    attempt = 0
    while True:
        try:
            return _fetch_once(client, url, cfg)
        except FetchError as e:
            retry = e.reason.startswith("http_") and int(e.reason[5:]) in RETRY_STATUS
            err: FetchError = e
        except httpx.TimeoutException as e:
            retry, err = True, FetchError("timeout", f"{url}: timed out ({type(e).__name__})")
        except httpx.TransportError as e:
            retry, err = True, FetchError("connection_error", f"{url}: {type(e).__name__}: {e}")
        except httpx.HTTPError as e:  # invalid URL, too many redirects, ...
            retry, err = False, FetchError("bad_url", f"{url}: {type(e).__name__}: {e}")
        if not retry or attempt >= cfg.retries:
            if attempt:
                err.detail += f" (after {attempt + 1} attempts)"
            raise err
        time.sleep(cfg.backoff * (2**attempt) * (0.5 + random.random()))
        attempt += 1
