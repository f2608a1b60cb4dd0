"""Getting image bytes from an `image_url`: `data:` URIs and http(s) URLs, the latter behind an SSRF guard.

A server that fetches URLs for strangers must not become their proxy into its own network. The guard:
  * only http and https, no credentials in the URL;
  * the host is resolved once, and EVERY resolved address must be public (not loopback, private, link-local,
    multicast, reserved, unspecified, shared/CGNAT, or an IPv4-mapped/6to4/Teredo form of one); a literal IP
    address is checked the same way, so `http://127.0.0.1/` is refused before any connection is made;
  * the connection goes to the address that was checked (the URL host is replaced by the IP; `Host` and the
    TLS SNI/certificate name stay the original name), so a DNS answer that changes between check and connect
    (rebinding) cannot redirect it;
  * redirects are followed by hand, each hop checked again, at most `max_redirects`;
  * a total time limit and a byte limit enforced while streaming (a lying Content-Length does not help);
  * the environment's proxy settings are ignored (a proxy would fetch the unchecked name itself).
Every refusal is an `ImageFetchError` (a ValueError) with an HTTP status for the client: 400, or 413 when too big.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import ipaddress
import re
import socket
import urllib.parse

import httpx

DEFAULT_MAX_BYTES = 20 * 1024 * 1024


class ImageFetchError(ValueError):
  def __init__(self, message: str, status: int = 400, code: str = "invalid_image_url"):
    super().__init__(message)
    self.status, self.code = status, code


@dataclasses.dataclass(frozen=True)
class FetchLimits:
  max_bytes: int = DEFAULT_MAX_BYTES
  timeout_s: float = 10.0
  max_redirects: int = 3
  # Only for tests and trusted deployments that serve images from their own network.
  allow_private: bool = False


_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def _too_big(n: int, limit: int) -> ImageFetchError:
  return ImageFetchError(f"image is {n} bytes, over the limit of {limit} bytes", status=413, code="image_too_large")


def decode_data_uri(url: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
  """Bytes of a `data:[mime];base64,...` URI (the only data URI form that carries binary data reliably)."""
  m = _DATA_URI.match(url)
  if not m:
    raise ImageFetchError("malformed data URI: expected data:<mime>;base64,<data>")
  if not m.group("b64"):
    raise ImageFetchError("data URI must be base64-encoded (data:<mime>;base64,...)")
  payload = url[m.end():]
  # base64 expands 3 bytes to 4 characters: refuse before decoding what could not fit.
  if len(payload) // 4 * 3 > max_bytes + 3:
    raise _too_big(len(payload) // 4 * 3, max_bytes)
  try:
    data = base64.b64decode(payload.strip(), validate=True)
  except (binascii.Error, ValueError):
    raise ImageFetchError("data URI: invalid base64 data") from None
  if len(data) > max_bytes:
    raise _too_big(len(data), max_bytes)
  if not data:
    raise ImageFetchError("data URI: empty image data")
  return data


_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # CGNAT: not is_private on every Python version


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
  if isinstance(ip, ipaddress.IPv6Address):
    # Forms that embed an IPv4 address reach that address.
    embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
    if embedded is not None:
      return is_public_address(embedded)
  return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
              or ip.is_unspecified or ip in _SHARED_ADDRESS_SPACE) and ip.is_global


async def _resolve(host: str, port: int) -> list[str]:
  try:
    return [ipaddress.ip_address(host).compressed]
  except ValueError:
    pass
  try:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except (socket.gaierror, UnicodeError) as e:
    raise ImageFetchError(f"cannot resolve image URL host {host!r}: {e}") from None
  return sorted({info[4][0].split("%")[0] for info in infos})  # strip an IPv6 zone id


async def _checked_address(url: str, limits: FetchLimits) -> tuple[urllib.parse.SplitResult, str]:
  parts = urllib.parse.urlsplit(url)
  if parts.scheme not in ("http", "https"):
    raise ImageFetchError(f"image URL scheme {parts.scheme!r} is not allowed; use http(s) or a data: URI")
  if parts.username or parts.password:
    raise ImageFetchError("image URL must not contain credentials")
  try:
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
  except ValueError as e:
    raise ImageFetchError(f"malformed image URL: {e}") from None
  if not host:
    raise ImageFetchError("image URL has no host")
  addresses = await _resolve(host, port)
  if not addresses:
    raise ImageFetchError(f"image URL host {host!r} resolved to no address")
  if not limits.allow_private:
    for a in addresses:
      if not is_public_address(ipaddress.ip_address(a)):
        raise ImageFetchError(f"image URL host {host!r} resolves to a non-public address ({a}); refused")
  return parts, addresses[0]


def _pinned(parts: urllib.parse.SplitResult, address: str) -> tuple[httpx.URL, dict, dict]:
  """The request for `parts` sent to `address`, keeping the original name for Host and TLS."""
  url = httpx.URL(urllib.parse.urlunsplit(parts))
  host = parts.hostname
  headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
  extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
  return url.copy_with(host=address), headers, extensions


async def fetch_url(url: str, limits: FetchLimits = FetchLimits()) -> bytes:
  """GETs an http(s) image URL under the SSRF guard and limits described in the module docstring."""
  try:
    return await asyncio.wait_for(_fetch(url, limits), timeout=limits.timeout_s)
  except asyncio.TimeoutError:
    raise ImageFetchError(f"fetching the image URL took longer than {limits.timeout_s:g} s") from None


async def _fetch(url: str, limits: FetchLimits) -> bytes:
  async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=limits.timeout_s) as client:
    for _ in range(limits.max_redirects + 1):
      parts, address = await _checked_address(url, limits)
      target, headers, extensions = _pinned(parts, address)
      try:
        async with client.stream("GET", target, headers=headers, extensions=extensions) as resp:
          if resp.is_redirect:
            location = resp.headers.get("location")
            if not location:
              raise ImageFetchError("image URL redirect without a Location header")
            url = urllib.parse.urljoin(url, location)
            continue
          if resp.status_code != 200:
            raise ImageFetchError(f"fetching the image URL returned HTTP {resp.status_code}")
          declared = resp.headers.get("content-length")
          if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise _too_big(int(declared), limits.max_bytes)
          data = bytearray()
          async for chunk in resp.aiter_bytes():
            data += chunk
            if len(data) > limits.max_bytes:
              raise _too_big(len(data), limits.max_bytes)
          return bytes(data)
      except httpx.HTTPError as e:
        raise ImageFetchError(f"fetching the image URL failed: {type(e).__name__}: {e}") from None
    raise ImageFetchError(f"image URL redirected more than {limits.max_redirects} times")


async def load_image_bytes(url: str, limits: FetchLimits = FetchLimits()) -> bytes:
  """Bytes behind an `image_url.url`: a data URI or an http(s) URL."""
  if url[:5].lower() == "data:":
    return decode_data_uri(url, limits.max_bytes)
  return await fetch_url(url, limits)
