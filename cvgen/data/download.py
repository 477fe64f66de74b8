"""Fetching photos for ``cvgen data prepare``: the SSRF-safe fetcher of :mod:`cvgen.netfetch`
plus retries with backoff, a content-type check and a magic-byte check. Callers bound the
concurrency (``cvgen.data.prepare`` runs rows in a thread pool; each fetch runs on its own
event loop in its worker thread)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from cvgen.data.metadata import DataError
from cvgen.netfetch import FetchError, IPNetwork, fetch_image_bytes_sync, parse_networks

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
# Content-Type prefixes accepted for photos (a missing header passes; the bytes decide)
IMAGE_TYPES = ("image/", "application/octet-stream")


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
        deadline: seconds for one whole attempt, redirects and body included.
        retries: further attempts after a timeout, a connection error or a 408/429/5xx.
        backoff: first wait between attempts in seconds; doubles each time (with jitter).
        max_bytes: largest accepted response body.
        max_redirects: redirects followed per URL (each hop's address is checked again).
        allow_networks: networks (CIDR) fetched from although not public; by default
            loopback, private, link-local (cloud metadata) and other non-public addresses
            are refused, for the URL and for every redirect.
        user_agent: the User-Agent header.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    deadline: float = 120.0
    retries: int = 3
    backoff: float = 0.5
    max_bytes: int = 30 * 1024 * 1024
    max_redirects: int = 5
    allow_networks: tuple[str, ...] = ()
    user_agent: str = "cvgen-data-prepare/0.1"

    def __post_init__(self) -> None:
        try:
            self.networks: list[IPNetwork] = parse_networks(self.allow_networks)
        except ValueError as e:
            raise DataError(f"allow_networks: {e}") from None


def _fetch_once(url: str, cfg: HttpConfig) -> bytes:
    try:
        data = fetch_image_bytes_sync(
            url,
            cfg.networks,
            max_bytes=cfg.max_bytes,
            max_redirects=cfg.max_redirects,
            timeout=cfg.deadline,
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            content_types=IMAGE_TYPES,
            user_agent=cfg.user_agent,
        )
    except FetchError as e:
        hint = " (--allow-network CIDR permits it)" if e.reason == "blocked_address" else ""
        raise FetchError(e.reason, f"{url}: {e.message}{hint}") from None
    check_image_bytes(data, url)
    return data


def fetch(url: str, cfg: HttpConfig) -> bytes:
    """The body of ``url``, checked to be an image. Retries timeouts, connection errors and
    408/429/5xx answers with exponential backoff; raises :class:`FetchError` with a reason
    code (``http_404``, ``timeout``, ``connection_error``, ``blocked_address``,
    ``too_large``, ...)."""
    attempt = 0
    while True:
        try:
            return _fetch_once(url, cfg)
        except FetchError as e:
            if not e.transient or attempt >= cfg.retries:
                if attempt:
                    detail = f"{e.message} (after {attempt + 1} attempts)"
                    raise FetchError(e.reason, detail) from None
                raise
        time.sleep(cfg.backoff * (2**attempt) * (0.5 + random.random()))
        attempt += 1
