"""Fetch a client's ``image_url`` without opening the server's network to the client (SSRF).

- http and https only; no credentials in the URL; no proxies from the environment.
- The host is resolved once, every address is checked, and the connection goes to the checked
  address (the Host header and TLS SNI keep the name), so DNS rebinding cannot swap it.
- Addresses that are not globally routable (loopback, private, link-local and so the cloud
  metadata service at 169.254.169.254, CGNAT, multicast, reserved) are refused unless a
  network in ``allowlist`` contains them.
- Redirects are followed by hand (each hop checked again), up to ``max_redirects``.
- One deadline covers the whole fetch; the body is capped at ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from cvgen.serve.schema import ClientError

FIELD = "image_url"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _fail(message: str, status: int = 422) -> ClientError:
    return ClientError(status, FIELD, message)


def parse_networks(allowlist: Sequence[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(n, strict=False) for n in allowlist]


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
        raise _fail(f"cannot resolve host {host[:100]!r}") from e
    out: list[IPAddress] = []
    for info in infos:
        addr = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        out.append(ipaddress.ip_address(addr))
    if not out:
        raise _fail(f"cannot resolve host {host[:100]!r}")
    return out


async def _checked_target(url: str, allowlist: Sequence[IPNetwork]) -> tuple[str, str, str]:
    """(URL with the host replaced by a checked IP, original host, Host header value)."""
    if len(url) > 2048:
        raise _fail("is longer than 2048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _fail(f"is not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _fail("must be an http or https URL")
    host = parts.hostname
    if not host:
        raise _fail("has no host")
    if parts.username is not None or parts.password is not None:
        raise _fail("must not contain credentials")
    port = port or (443 if scheme == "https" else 80)
    addresses = await resolve(host, port)
    for ip in addresses:
        if not address_allowed(ip, allowlist):
            raise _fail(f"points to a non-public address ({ip}); refused", status=403)
    ip = addresses[0]
    ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = f"{ip_host}:{port}"
    default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    host_header = host if default_port else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if default_port else f"[{host}]:{port}"
    pinned = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    return pinned, host, host_header


async def _fetch(
    url: str, allowlist: Sequence[IPNetwork], max_bytes: int, max_redirects: int, timeout: float
) -> bytes:
    async with httpx.AsyncClient(
        trust_env=False, follow_redirects=False, timeout=httpx.Timeout(timeout)
    ) as client:
        for _ in range(max_redirects + 1):
            pinned, host, host_header = await _checked_target(url, allowlist)
            request = client.build_request(
                "GET",
                pinned,
                headers={"Host": host_header, "Accept": "image/*", "User-Agent": "cvgen-serve"},
                extensions={"sni_hostname": host},
            )
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise _fail("redirect without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise _fail(f"the server answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise _fail(f"the image is larger than {max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise _fail(f"the image is larger than {max_bytes} bytes")
                return bytes(body)
            finally:
                await response.aclose()
    raise _fail(f"more than {max_redirects} redirects")


async def fetch_image_bytes(
    url: str,
    allowlist: Sequence[IPNetwork] = (),
    max_bytes: int = 10_000_000,
    max_redirects: int = 3,
    timeout: float = 10.0,
) -> bytes:
    """The body at ``url`` (see the module docstring for the rules); :class:`ClientError`
    (422, or 403 for a refused address) on any failure."""
    try:
        return await asyncio.wait_for(
            _fetch(url, allowlist, max_bytes, max_redirects, timeout), timeout
        )
    except ClientError:
        raise
    except (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException):
        raise _fail(f"no complete answer within {timeout:g} s") from None
    except (httpx.HTTPError, OSError, ValueError) as e:
        raise _fail(f"cannot fetch ({type(e).__name__})") from None
