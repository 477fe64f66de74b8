"""Fetch an image URL without opening the caller's network to whoever wrote the URL (SSRF).

One fetcher for the server (a client's ``image_url``) and for ``cvgen data prepare`` (photo
lists): URLs come from people the machine should not trust with its own network.

- http and https only; no credentials in the URL; no proxies from the environment.
- The host is resolved once, every address is checked, and the connection goes to the checked
  address (the Host header and TLS SNI keep the name, so the certificate is still verified
  against it), so DNS rebinding cannot swap the address between check and connect.
- Addresses that are not globally routable (loopback, private, link-local and so the cloud
  metadata service at 169.254.169.254, CGNAT, multicast, reserved) are refused unless a
  network in ``allowlist`` contains them.
- Redirects are followed by hand, each hop checked again, up to ``max_redirects``.
- One deadline covers the whole fetch, redirects included; the body is capped at ``max_bytes``
  (counted after content decoding, so a compressed bomb stops at the cap too).

Every failure is a :class:`FetchError` with a short reason code; callers map it to their own
errors (the server to a 4xx, prepare to a line of ``rejected.jsonl``).

The core is async (the server fetches on its event loop); :func:`fetch_image_bytes_sync` runs
it on a fresh event loop for callers in threads (prepare's worker pool). Each fetch has its own
client: a pooled connection, pinned to an IP with one host's certificate, is never reused for
another host name.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

P = ParamSpec("P")
T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_URL_CHARS = 2048
# answers worth another try later; other 4xx are final
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class FetchError(Exception):
    """A URL could not be fetched.

    ``reason`` is a short code: ``bad_url``, ``blocked_address``, ``connection_error``,
    ``timeout``, ``http_<status>``, ``too_many_redirects``, ``bad_content_type``,
    ``too_large`` or ``bad_response``; ``message`` says what happened in words.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        """Whether trying again later may succeed; see :func:`is_transient`."""
        return is_transient(self.reason)


def is_transient(reason: str) -> bool:
    """Whether a failure with this reason code may pass on another try: timeouts, connection
    errors and HTTP 408/425/429/500/502/503/504. Everything else is final."""
    if reason in ("timeout", "connection_error"):
        return True
    code = reason.removeprefix("http_")
    return code.isdigit() and int(code) in TRANSIENT_STATUS


def parse_networks(allowlist: Sequence[str]) -> list[IPNetwork]:
    """The networks of ``allowlist`` (CIDRs such as ``10.0.0.0/8``); :class:`ValueError`
    naming the first entry that is not one."""
    out: list[IPNetwork] = []
    for entry in allowlist:
        try:
            out.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP network (CIDR such as 10.0.0.0/8)") from None
    return out


def address_allowed(ip: IPAddress, allowlist: Sequence[IPNetwork]) -> bool:
    """Globally routable addresses, or any address inside an allowlisted network."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allowlist):
        return True
    return ip.is_global and not ip.is_multicast


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError("connection_error", f"cannot resolve host {host[:100]!r}") from e
    out = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not out:
        raise FetchError("connection_error", f"cannot resolve host {host[:100]!r}")
    return out


async def _checked_target(
    url: str, allowlist: Sequence[IPNetwork], hop: int
) -> tuple[str, str, str]:
    """(URL with the host replaced by a checked IP, original host, Host header value)."""
    if len(url) > MAX_URL_CHARS:
        raise FetchError("bad_url", f"is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchError("bad_url", f"is not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("bad_url", "must be an http or https URL")
    host = parts.hostname
    if not host:
        raise FetchError("bad_url", "has no host")
    if parts.username is not None or parts.password is not None:
        raise FetchError("bad_url", "must not contain credentials")
    port = port or (443 if scheme == "https" else 80)
    addresses = await resolve(host, port)
    for ip in addresses:
        if not address_allowed(ip, allowlist):
            where = f"redirects to {url[:200]}, which " if hop else ""
            raise FetchError(
                "blocked_address", f"{where}points to a non-public address ({ip}); refused"
            )
    ip = addresses[0]
    ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
    default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    name = f"[{host}]" if ":" in host else host
    host_header = name if default_port else f"{name}:{port}"
    pinned = urlunsplit((scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, ""))
    return pinned, host, host_header


def _check_content_type(response: httpx.Response, content_types: Sequence[str] | None) -> None:
    if content_types is None:
        return
    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith(tuple(content_types)):
        raise FetchError("bad_content_type", f"content-type {ctype!r} is not an image")


async def _fetch(
    url: str,
    allowlist: Sequence[IPNetwork],
    max_bytes: int,
    max_redirects: int,
    timeout: httpx.Timeout,
    content_types: Sequence[str] | None,
    user_agent: str,
) -> bytes:
    async with httpx.AsyncClient(
        trust_env=False, follow_redirects=False, timeout=timeout
    ) as client:
        for hop in range(max_redirects + 1):
            pinned, host, host_header = await _checked_target(url, allowlist, hop)
            request = client.build_request(
                "GET",
                pinned,
                headers={"Host": host_header, "Accept": "image/*", "User-Agent": user_agent},
                extensions={"sni_hostname": host},
            )
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:  # a 3xx with a Location
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchError(
                        f"http_{response.status_code}",
                        f"the server answered HTTP {response.status_code}",
                    )
                _check_content_type(response, content_types)
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise FetchError("too_large", f"the image is larger than {max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise FetchError("too_large", f"the image is larger than {max_bytes} bytes")
                return bytes(body)
            finally:
                await response.aclose()
    raise FetchError("too_many_redirects", f"more than {max_redirects} redirects")


async def fetch_image_bytes(
    url: str,
    allowlist: Sequence[IPNetwork] = (),
    max_bytes: int = 10_000_000,
    max_redirects: int = 3,
    timeout: float = 10.0,
    *,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    content_types: Sequence[str] | None = None,
    user_agent: str = "cvgen",
) -> bytes:
    """The body at ``url``, by the rules of the module docstring.

    Args:
        url: an http or https URL.
        allowlist: networks whose addresses are allowed although not public.
        max_bytes: largest body accepted.
        max_redirects: redirects followed (each hop is checked like the first).
        timeout: deadline in seconds for the whole fetch, redirects included.
        connect_timeout: seconds to connect (default: ``timeout``).
        read_timeout: seconds to wait for each piece of the answer (default: ``timeout``).
        content_types: if given, accepted Content-Type prefixes (a missing header passes).
        user_agent: the User-Agent header.

    Raises:
        FetchError: on any failure; ``reason`` says which (see :class:`FetchError`).
    """
    phases = httpx.Timeout(
        timeout,
        connect=connect_timeout or timeout,
        read=read_timeout or timeout,
    )
    try:
        return await asyncio.wait_for(
            _fetch(url, allowlist, max_bytes, max_redirects, phases, content_types, user_agent),
            timeout,
        )
    except FetchError:
        raise
    except (TimeoutError, asyncio.TimeoutError):
        raise FetchError("timeout", f"no complete answer within {timeout:g} s") from None
    except httpx.TimeoutException as e:
        raise FetchError("timeout", f"timed out ({type(e).__name__})") from None
    except (httpx.TransportError, OSError) as e:
        raise FetchError("connection_error", f"cannot fetch ({type(e).__name__})") from None
    except httpx.InvalidURL as e:
        raise FetchError("bad_url", f"is not a valid URL ({e})") from None
    except (httpx.HTTPError, httpx.StreamError, ValueError) as e:
        raise FetchError("bad_response", f"cannot fetch ({type(e).__name__})") from None


def _in_own_loop(fetch: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    @functools.wraps(fetch)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return asyncio.run(fetch(*args, **kwargs))

    return run


fetch_image_bytes_sync = _in_own_loop(fetch_image_bytes)
"""``fetch_image_bytes`` for code without an event loop (prepare's worker threads): the same
arguments and errors, run on a fresh event loop in the calling thread."""
