"""A local OAuth2 token endpoint (HTTPS) that behaves like the Microsoft identity platform.

Runs its own event loop in a thread so both async tests and ``relay check`` subprocesses
can use it. Grants: client_credentials (secret, or an RS256 client assertion verified
against a registered certificate) and refresh_token (rotating refresh tokens). Errors
carry ``error``, ``error_description`` with AADSTS codes and ``error_codes`` like Entra ID.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.peers import free_port, refuse_in_fast_lane


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@dataclass
class TokenServer:
    client_id: str = "app-id"
    client_secret: str = "app-secret-value"
    refresh_tokens: set[str] = field(default_factory=lambda: {"rt-initial"})
    certificate_pem: bytes | None = None      # registered certificate for client assertions
    expires_in: int = 3600
    rotate: bool = True
    chunked: bool = False
    delay: float = 0.0
    requests: list[dict[str, str]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    port: int = 0
    tls: bool = True

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/tenant-id/oauth2/v2.0/token"

    def _error(self, status: int, error: str, code: int,
               text: str) -> tuple[int, dict[str, object]]:
        return status, {"error": error, "error_description": f"AADSTS{code}: {text}\r\n"
                        "Trace ID: 0000 Correlation ID: 1111 Timestamp: 2026-01-01 00:00:00Z",
                        "error_codes": [code]}

    def _issue(self, extra: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
        token = f"at-{len(self.issued) + 1}-{'x' * 20}"
        self.issued.append(token)
        body: dict[str, object] = {"token_type": "Bearer", "expires_in": self.expires_in,
                                   "access_token": token}
        body.update(extra or {})
        return 200, body

    def _assertion_ok(self, jwt: str) -> bool:
        if self.certificate_pem is None:
            return False
        cert = x509.load_pem_x509_certificate(self.certificate_pem)
        head, claims, sig = jwt.split(".")
        key = cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        try:
            key.verify(_b64d(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(),
                       hashes.SHA256())
        except Exception:
            return False
        c = json.loads(_b64d(claims))
        return bool(c["iss"] == c["sub"] == self.client_id and c["aud"] == self.url)

    def respond(self, form: dict[str, str]) -> tuple[int, dict[str, object]]:
        self.requests.append(form)
        grant = form.get("grant_type")
        if form.get("client_id") != self.client_id:
            return self._error(400, "unauthorized_client", 700016,
                               f"Application with identifier '{form.get('client_id')}' was "
                               "not found in the directory 'tenant-id'.")
        if grant == "client_credentials":
            if "client_assertion" in form:
                if not self._assertion_ok(form["client_assertion"]):
                    return self._error(401, "invalid_client", 700027,
                                       "Client assertion failed signature validation.")
            elif form.get("client_secret") != self.client_secret:
                return self._error(401, "invalid_client", 7000215,
                                   "Invalid client secret provided. Ensure the secret being "
                                   "sent in the request is the client secret value, not the "
                                   "client secret ID.")
            return self._issue()
        if grant == "refresh_token":
            rt = form.get("refresh_token", "")
            if rt not in self.refresh_tokens:
                return self._error(400, "invalid_grant", 70008,
                                   "The provided authorization code or refresh token has "
                                   "expired due to inactivity.")
            extra: dict[str, object] = {}
            if self.rotate:
                self.refresh_tokens.discard(rt)
                new = f"rt-rotated-{len(self.issued) + 1}"
                self.refresh_tokens.add(new)
                extra["refresh_token"] = new
            return self._issue(extra)
        return self._error(400, "unsupported_grant_type", 70003, "unsupported grant type")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            form = dict(urllib.parse.parse_qsl(body.decode()))
            if self.delay:
                await asyncio.sleep(self.delay)    # a slow identity platform, on purpose
            status, payload = self.respond(form)
            data = json.dumps(payload).encode()
            reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized"}.get(status, "X")
            if self.chunked:
                half = len(data) // 2
                framed = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n"
                                  for p in (data[:half], data[half:])) + b"0\r\n\r\n"
                hdr = "Transfer-Encoding: chunked"
            else:
                framed, hdr = data, f"Content-Length: {len(data)}"
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; "
                         f"charset=utf-8\r\n{hdr}\r\nConnection: close\r\n\r\n".encode()
                         + framed)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


@contextlib.contextmanager
def token_server(ca: trustme.CA | None, **kw: object) -> Iterator[TokenServer]:
    """Serve on 127.0.0.1 (HTTPS with a ``ca``-issued cert for 127.0.0.1, else HTTP)."""
    refuse_in_fast_lane("a token server on loopback")
    srv = TokenServer(tls=ca is not None, **kw)  # type: ignore[arg-type]
    srv.port = free_port()
    ctx: ssl.SSLContext | None = None
    if ca is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = await asyncio.start_server(srv._handle, "127.0.0.1", srv.port, ssl=ctx)
        started.set()
        async with server:
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("token server did not start")
    try:
        yield srv
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
