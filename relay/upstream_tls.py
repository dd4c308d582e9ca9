"""TLS toward upstreams: client contexts, classified handshake failures, handshake timing."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Iterator
from typing import ClassVar

from relay.config.schema import UpstreamConfig
from relay.timing import StageTimer


def ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind an exception (libraries wrap it), if there is one."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def describe_tls_failure(upstream: UpstreamConfig, exc: BaseException,
                         server_name: str) -> tuple[str, str, str]:
    """(message, reason, hint) for a failed handshake: certificate or other TLS failure."""
    cause = ssl_cause(exc)
    where = f"{upstream.name} ({upstream.host}:{upstream.port})"
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = cause.verify_message or str(cause)
        return (f"TLS certificate of {where} not accepted: {detail}; expected name "
                f"{server_name!r}", "tls_certificate",
                "check ca_file (the CA that signed the provider's certificate) and "
                "tls_server_name; verify_tls = false is a last resort, per upstream")
    return (f"TLS handshake with {where} failed: {cause or exc}", "tls_failed",
            "the provider may require another TLS version, or a middlebox interferes; "
            "check tls = starttls|implicit matches the port (587 starttls, 465 implicit)")


async def client_context(upstream: UpstreamConfig) -> ssl.SSLContext:
    """A client TLS context for ``upstream`` (CA file loaded off the loop)."""
    def build() -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            cafile=str(upstream.ca_file) if upstream.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not upstream.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return await asyncio.to_thread(build)


class _TimedSSLObject(ssl.SSLObject):
    """Stamps when its TLS handshake completed (via ``SSLContext.sslobject_class``)."""

    stamps: ClassVar[list[float]] = []   # a fresh subclass per connection owns its own

    def do_handshake(self) -> None:
        super().do_handshake()
        type(self).stamps.append(time.monotonic())


@contextlib.contextmanager
def split_handshake(timer: StageTimer, ctx: ssl.SSLContext | None) -> Iterator[None]:
    """Time a connect call as greeting, or, for implicit TLS, as tls then greeting."""
    if ctx is None:
        with timer.stage("greeting"):
            yield
        return
    stamps: list[float] = []
    ctx.sslobject_class = type("_Timed", (_TimedSSLObject,), {"stamps": stamps})
    start = time.monotonic()
    try:
        yield
    finally:
        end = time.monotonic()
        done = stamps[0] if stamps else 0.0
        if start < done <= end:
            timer.add("tls", done - start)
            timer.add("greeting", end - done)
        else:
            timer.add("tls", end - start)
