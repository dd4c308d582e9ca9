"""TLS, its one owner: server and client contexts, certificate facts, failures explained.

Server contexts for every listener, client contexts toward upstreams, certificate facts,
one explanation of TLS failures, and handshake timing.

Server side (SMTP, IMAP and POP3 listeners alike): TLS 1.2+, no renegotiation, the
certificate chain loaded and proven before it replaces a working one. Client side: the
system CAs (or the upstream's ``ca_file``), TLS 1.2+, hostname checked unless
``verify_tls = false`` for that upstream. Every handshake or certificate failure, in
delivery, the proxy, ``relay check`` or an OAuth2 request, is explained by
``classify_tls_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from relay.config.schema import ListenerConfig, UpstreamConfig
from relay.errors import ConfigError, TransportError
from relay.timing import StageTimer


def server_context(cfg: ListenerConfig, into: ssl.SSLContext | None = None) -> ssl.SSLContext:
    """A listener's TLS context toward clients: TLS 1.2+, no renegotiation.

    The pair is first loaded into a fresh context; only when that worked is it loaded into
    ``into`` (the context a running server holds, on reload), so a bad pair never
    half-replaces a working one. Raises ConfigError naming the listener and what to fix.
    """
    key = f"listener.{cfg.name}"
    if cfg.cert is None or cfg.key is None:
        raise ConfigError(f"listener {cfg.name}: tls = {cfg.tls!r} needs cert and key",
                          line=cfg.line or None, key=f"{key}.cert",
                          hint="set cert and key to PEM files, or tls = \"none\"")
    fresh = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _harden(fresh)
    try:
        fresh.load_cert_chain(str(cfg.cert), str(cfg.key))
        if into is None:
            return fresh
        _harden(into)
        into.load_cert_chain(str(cfg.cert), str(cfg.key))
        return into
    except OSError as exc:
        raise ConfigError(f"listener {cfg.name}: cannot load cert {cfg.cert} / key {cfg.key} "
                          f"({exc.strerror or exc})", line=cfg.line or None, key=f"{key}.cert",
                          hint=f"check that {cfg.cert} and {cfg.key} exist and relay "
                               "may read them") from None
    except ssl.SSLError as exc:
        raise ConfigError(f"listener {cfg.name}: cannot load cert {cfg.cert} / key {cfg.key}: "
                          f"unusable ({exc.reason or exc})", line=cfg.line or None,
                          key=f"{key}.key",
                          hint="cert must be PEM (leaf first, then intermediates) and key "
                               "its matching unencrypted PEM private key") from None


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION

def server_name(cfg: UpstreamConfig) -> str:
    """The name the upstream's certificate must carry (tls_server_name, else host)."""
    return cfg.tls_server_name or cfg.host


def client_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    """A client context: system CAs (or ``ca_file``), TLS 1.2+, hostname checked.

    ``verify_tls = false`` switches verification off for this upstream only; callers log
    that loudly. Raises TransportError(reason="tls_config") if the CA file is unusable.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(cfg.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(
                f"upstream {cfg.name}: cannot load ca_file {cfg.ca_file}: {exc}",
                reason="tls_config",
                hint="ca_file must be a readable PEM file of the CA certificates to trust "
                     "for this upstream") from exc
    if not cfg.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What an operator wants to know about a server certificate."""

    subject_cn: str
    names: tuple[str, ...]            # subjectAltName DNS names and IP addresses
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime

    def describe(self) -> str:
        names = ", ".join(self.names) or "no subjectAltName"
        cn = f"CN={self.subject_cn}, " if self.subject_cn and \
            self.subject_cn not in self.names else ""
        return (f"a certificate for {cn}{names}, issued by {self.issuer}, "
                f"valid until {self.not_after:%Y-%m-%d}")


def cert_info(der: bytes) -> CertInfo:
    """Parse a DER certificate (``SSLObject.getpeercert(binary_form=True)``)."""
    # Imported here: cryptography's X.509 layer is about 4 MB of memory in every process,
    # and an SMTP listener process describes no certificate.
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)

    def cn(name: x509.Name) -> str:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = attrs[0].value if attrs else ""
        return value.decode() if isinstance(value, bytes) else value

    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += san.get_values_for_type(x509.DNSName)
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    return CertInfo(subject_cn=cn(cert.subject), names=tuple(names),
                    issuer=cn(cert.issuer) or cert.issuer.rfc4514_string(),
                    not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc)


def peer_cert_info(obj: ssl.SSLObject | ssl.SSLSocket | None) -> CertInfo | None:
    """Certificate facts of an established TLS connection, if it has a peer cert."""
    if obj is None:
        return None
    der = obj.getpeercert(binary_form=True)
    return cert_info(der) if der else None


def classify_tls_error(exc: BaseException, expected_name: str,
                       peer_cert: bytes | CertInfo | None = None) -> TransportError:
    """Explain a TLS failure: certificate problems (name, expiry, CA) or handshake failure.

    ``peer_cert`` (DER or CertInfo), when the caller could fetch it with verification off,
    lets the message name what the server presented.
    """
    info = cert_info(peer_cert) if isinstance(peer_cert, bytes) else peer_cert
    presented = f"; the server presented {info.describe()}" if info else ""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        detail = exc.verify_message or str(exc)
        if code == 62 or "hostname mismatch" in detail.lower() or "ip address mismatch" in \
                detail.lower():
            shown = f"; the server presented {info.describe()}" if info else ""
            return TransportError(
                f"TLS certificate does not match: expected {expected_name}{shown}",
                reason="tls_certificate",
                hint="connect with the name the provider's certificate carries (upstream "
                     "host, or tls_server_name when connecting by IP or through a tunnel); "
                     "a different name may mean interception by a middlebox")
        if code == 10 or "expired" in detail.lower():
            return TransportError(
                f"TLS certificate of {expected_name} has expired{presented}",
                reason="tls_certificate",
                hint="the server's certificate is out of date (or this host's clock is "
                     "wrong: check NTP); the provider must renew it")
        if code == 9 or "not yet valid" in detail.lower():
            return TransportError(
                f"TLS certificate of {expected_name} is not yet valid{presented}",
                reason="tls_certificate", hint="check this host's clock (NTP)")
        if code in (2, 18, 19, 20, 21):
            return TransportError(
                f"TLS certificate of {expected_name} is not trusted: {detail}{presented}",
                reason="tls_certificate",
                hint="the certificate was issued by a CA this host does not trust: set "
                     "ca_file on the upstream to that CA's PEM, or install it system-wide; "
                     "an unexpected issuer may mean a TLS-intercepting proxy")
        return TransportError(f"TLS certificate of {expected_name} rejected: {detail}{presented}",
                              reason="tls_certificate",
                              hint="check the upstream's certificate chain and ca_file")
    if isinstance(exc, ssl.SSLError):
        detail = exc.reason or str(exc)
        hint = "check that the port speaks TLS the way tls = ... says (implicit TLS on 465/993/" \
               "995, STARTTLS on 587/143/110) and that both sides share a TLS version"
        if "WRONG_VERSION_NUMBER" in str(detail).upper():
            hint = ("the server did not answer with TLS: use tls = \"starttls\" for ports 25/587/"
                    "143/110, tls = \"implicit\" for 465/993/995")
        return TransportError(f"TLS handshake with {expected_name} failed: {detail}",
                              reason="tls_failed", hint=hint)
    if isinstance(exc, TimeoutError):
        return TransportError(f"TLS handshake with {expected_name} timed out",
                              reason="tls_failed",
                              hint="the server or a middlebox stalled the handshake")
    return TransportError(f"TLS handshake with {expected_name} failed: {exc or type(exc).__name__}",
                          reason="tls_failed",
                          hint="the connection was closed during the handshake: check the port "
                               "and the tls mode of the upstream")


def tls_detail(version: str, info: CertInfo | None) -> str:
    """One line for an operator: TLS version, certificate name and expiry (warns < 21 days)."""
    if info is None:
        return f"{version}, no certificate (verification off)"
    left = (info.not_after - dt.datetime.now(dt.UTC)).days
    warn = f" (EXPIRES IN {left} DAYS)" if left < 21 else ""
    label = f"CN={info.subject_cn}" if info.subject_cn else \
        f"for {', '.join(info.names[:3]) or 'no names'}"
    return f"{version}, certificate {label} valid until {info.not_after:%Y-%m-%d}{warn}"


def ssl_object_detail(obj: ssl.SSLObject | None) -> str:
    """``tls_detail`` of an established connection (relay check's tls steps)."""
    if obj is None:
        return "TLS"
    return tls_detail(obj.version() or "TLS", peer_cert_info(obj))


async def load_client_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    """``client_context`` built off the event loop (it reads the CA files)."""
    return await asyncio.to_thread(client_context, cfg)


def ssl_cause(exc: BaseException | None) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind an exception (libraries wrap it), if there is one."""
    seen = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


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
