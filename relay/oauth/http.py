"""A minimal HTTPS POST client over a relay transport, for OAuth2 token requests.

The stdlib has no async HTTP client and token requests must go through the same SOCKS5/SSH
transports as mail, so this is the small piece hand-written: HTTP/1.1, one request per
connection (``Connection: close``), responses framed by Content-Length, chunked encoding
or the end of the connection. ``ResponseParser`` is sans-IO (bytes in, response out).
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from relay import __version__
from relay.config.values import is_loopback_host
from relay.errors import TransportError
from relay.tls import classify_tls_error
from relay.transports.base import Transport

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024


class HttpProtocolError(ValueError):
    """The server's response is not valid HTTP/1.1 (or is too large)."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)   # lower-case names
    body: bytes = b""


class ResponseParser:
    """Sans-IO HTTP/1.1 response parser: ``feed()`` bytes, then read ``response``."""

    def __init__(self, *, max_body: int = MAX_BODY_BYTES, head_request: bool = False) -> None:
        self._buf = bytearray()
        self._max_body = max_body
        self._head = head_request
        self._state = "head"            # head, length, chunk-size, chunk-data, trailer, eof, done
        self._status = 0
        self._reason = ""
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._remaining = 0
        self.response: Response | None = None

    @property
    def done(self) -> bool:
        return self.response is not None

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._buf += data
        self._advance()

    def feed_eof(self) -> None:
        """The server closed the connection: completes an until-close body, else errors."""
        if self.done:
            return
        if self._state == "eof":
            self._finish()
            return
        raise HttpProtocolError(f"connection closed before the response was complete "
                                f"(while reading {self._state})")

    def _finish(self) -> None:
        self._state = "done"
        self.response = Response(self._status, self._reason, dict(self._headers),
                                 bytes(self._body))

    def _take_body(self, n: int) -> None:
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        self._body += chunk
        if len(self._body) > self._max_body:
            raise HttpProtocolError(f"response body larger than {self._max_body} bytes")

    def _line(self) -> bytes | None:
        i = self._buf.find(b"\n")
        if i < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise HttpProtocolError("response line too long")
            return None
        line = bytes(self._buf[:i]).rstrip(b"\r")
        del self._buf[:i + 1]
        return line

    def _advance(self) -> None:
        while not self.done:
            if self._state == "head":
                end = self._buf.find(b"\r\n\r\n")
                sep = 4
                if end < 0:
                    end, sep = self._buf.find(b"\n\n"), 2
                if end < 0:
                    if len(self._buf) > MAX_HEADER_BYTES:
                        raise HttpProtocolError("response headers too large")
                    return
                head = bytes(self._buf[:end]).decode("latin-1")
                del self._buf[:end + sep]
                self._parse_head(head)
            elif self._state == "length":
                n = min(self._remaining, len(self._buf))
                self._take_body(n)
                self._remaining -= n
                if self._remaining:
                    return
                self._finish()
            elif self._state == "eof":
                self._take_body(len(self._buf))
                return
            elif self._state == "chunk-size":
                line = self._line()
                if line is None:
                    return
                size = line.split(b";", 1)[0].strip()
                try:
                    self._remaining = int(size, 16)
                except ValueError:
                    raise HttpProtocolError(f"bad chunk size {size[:20]!r}") from None
                if self._remaining < 0:
                    raise HttpProtocolError("negative chunk size")
                if len(self._body) + self._remaining > self._max_body:
                    raise HttpProtocolError(f"response body larger than {self._max_body} bytes")
                self._state = "chunk-data" if self._remaining else "trailer"
            elif self._state == "chunk-data":
                if len(self._buf) < self._remaining + 2:
                    return
                if self._buf[self._remaining:self._remaining + 2] != b"\r\n":
                    raise HttpProtocolError("chunk not followed by CRLF")
                self._take_body(self._remaining)
                del self._buf[:2]
                self._state = "chunk-size"
            elif self._state == "trailer":
                line = self._line()
                if line is None:
                    return
                if not line:
                    self._finish()
            else:  # pragma: no cover
                return

    def _parse_head(self, head: str) -> None:
        lines = head.replace("\r\n", "\n").split("\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HttpProtocolError(f"bad header line: {line[:80]!r}")
            key = name.lower()
            value = value.strip()
            if key in headers and key == "content-length" and headers[key] != value:
                raise HttpProtocolError("conflicting Content-Length headers")
            headers[key] = f"{headers[key]}, {value}" if key in headers and \
                key != "content-length" else value
        if 100 <= status < 200:
            return                      # interim response (100 Continue): the real one follows
        self._status, self._reason = status, parts[2] if len(parts) > 2 else ""
        self._headers = headers
        te = headers.get("transfer-encoding", "").lower()
        if self._head or status in (204, 304):
            self._finish()
        elif te:
            if te.split(",")[-1].strip() != "chunked":
                raise HttpProtocolError(f"unsupported Transfer-Encoding {te!r}")
            self._state = "chunk-size"
        elif "content-length" in headers:
            cl = headers["content-length"]
            if not cl.isdigit():
                raise HttpProtocolError(f"bad Content-Length {cl[:20]!r}")
            self._remaining = int(cl)
            if self._remaining > self._max_body:
                raise HttpProtocolError(f"response body larger than {self._max_body} bytes")
            self._state = "length"
            if self._remaining == 0:
                self._finish()
        else:
            self._state = "eof"


def build_request(url: str, fields: Mapping[str, str],
                  headers: Mapping[str, str] | None = None) -> tuple[str, int, bool, bytes]:
    """``(host, port, tls, request bytes)`` for a form POST to ``url``.

    Only https, except plain http to a loopback address (a local test endpoint).
    """
    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme == "https"
    if not parts.hostname or not (tls or (parts.scheme == "http" and
                                          is_loopback_host(parts.hostname))):
        raise ValueError(f"token URL must be https://host/...: {url!r}")
    host, port = parts.hostname, parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    body = urllib.parse.urlencode(fields).encode("ascii")
    host_header = f"[{host}]" if ":" in host else host
    if port != (443 if tls else 80):
        host_header += f":{port}"
    lines = [f"POST {target} HTTP/1.1", f"Host: {host_header}",
             "Content-Type: application/x-www-form-urlencoded",
             f"Content-Length: {len(body)}", "Accept: application/json",
             f"User-Agent: relay/{__version__}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return host, port, tls, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def post_form(url: str, fields: Mapping[str, str], *, transport: Transport,
                    timeout: float, ssl_context: ssl.SSLContext | None = None,
                    headers: Mapping[str, str] | None = None) -> Response:
    """POST ``fields`` form-encoded to ``url`` through ``transport``; the whole exchange
    is bounded by ``timeout``. Raises TransportError (connect, TLS, timeout) or
    HttpProtocolError (malformed response)."""
    host, port, tls, request = build_request(url, fields, headers)
    ctx = (ssl_context or ssl.create_default_context()) if tls else None
    parser = ResponseParser()
    sock = None
    try:
        async with asyncio.timeout(timeout):
            sock = await transport.connect(host, port, timeout=timeout)
            try:
                reader, writer = await asyncio.open_connection(
                    sock=sock, ssl=ctx, server_hostname=host if ctx else None)
            except (ssl.SSLError, ConnectionError) as exc:
                raise classify_tls_error(exc, host) from None
            sock = None
            try:
                writer.write(request)
                await writer.drain()
                while not parser.done:
                    data = await reader.read(65536)
                    if not data:
                        parser.feed_eof()
                        break
                    parser.feed(data)
            finally:
                writer.close()
    except TimeoutError:
        raise TransportError(f"token request to {host}:{port} timed out after {timeout:g}s",
                             reason="http_timeout",
                             hint="the identity platform or the path to it (proxy) is slow or "
                                  "drops traffic") from None
    except OSError as exc:
        raise TransportError(f"token request to {host}:{port} failed: {exc}",
                             reason="http_failed",
                             hint="the connection broke; relay retries") from None
    finally:
        if sock is not None:
            sock.close()
    assert parser.response is not None
    return parser.response
