"""OAuth2 token sources: client credentials, refresh token, static file; cached, refreshed early.

Token requests go through the transport of the source's ``via`` proxy. Concurrent callers
share one request per source (single flight). A token is fresh while both clocks agree:
its wall-clock expiry (what the provider said, shown in metrics) and a monotonic
deadline, so setting the wall clock back never keeps an expired token in use. Tokens,
secrets and refresh tokens are never logged: only source names, expiry times and the
identity platform's error codes are.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relay.atomicfile import replace_file
from relay.config.schema import TokenSourceConfig
from relay.errors import OAuthError, RelayError, TransportError
from relay.metrics import Metrics
from relay.oauth.explain import token_error
from relay.oauth.http import HttpProtocolError, post_form
from relay.transports.factory import Transports

log = logging.getLogger("relay.oauth")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True, slots=True)
class Token:
    value: str = ""
    expires_at: float | None = None           # Unix time; None: unknown (static)
    deadline: float | None = None             # the same on the monotonic clock, if known

    def __repr__(self) -> str:                # never print the token
        return f"Token(expires_at={self.expires_at})"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def client_assertion(cfg: TokenSourceConfig, cert_pem: bytes, key_pem: bytes, *,
                     now: float) -> str:
    """An RS256 JWT client assertion (Microsoft identity platform certificate credential)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise OAuthError(f"token source {cfg.name}: certificate_key_file is not an RSA key",
                         error="config", hint="Entra ID certificate credentials use RSA keys")
    der = cert.public_bytes(serialization.Encoding.DER)
    header = {"alg": "RS256", "typ": "JWT", "x5t": _b64url(hashlib.sha1(der).digest())}
    claims = {"aud": cfg.token_url, "iss": cfg.client_id, "sub": cfg.client_id,
              "jti": str(uuid.uuid4()), "nbf": int(now), "iat": int(now),
              "exp": int(now) + 600}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     _b64url(json.dumps(claims, separators=(",", ":")).encode()))
    sig = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(sig)}"


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT access token (unverified: only to schedule refreshes)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return float(claims["exp"]) if isinstance(claims, dict) and "exp" in claims else None
    except (ValueError, TypeError, KeyError):
        return None


def write_private(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``, mode 0600 (tmp, fsync, rename, fsync dir)."""
    replace_file(path, text.encode("utf-8"), mode=0o600)


def read_static(path: Path) -> Token:
    """A static token file: the bare token, or JSON with access_token and expires_at/on.

    A sidecar ``<file>.expires`` (Unix seconds) or the token's own JWT ``exp`` gives the
    expiry when the file does not.
    """
    text = path.read_text(encoding="utf-8").strip()
    expires: float | None = None
    if text.startswith("{"):
        data = json.loads(text)
        value = str(data.get("access_token", ""))
        for k in ("expires_at", "expires_on"):
            if k in data:
                expires = float(data[k])
    else:
        value = text
    sidecar = path.with_name(path.name + ".expires")
    if expires is None and sidecar.exists():
        expires = float(sidecar.read_text().strip())
    return Token(value, expires if expires is not None else jwt_expiry(value))


class TokenSource:
    """One configured source with its cache and single-flight refresh."""

    def __init__(self, cfg: TokenSourceConfig, *, transports: Transports,
                 clock: Callable[[], float],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._transports = transports
        self._clock = clock
        self._monotonic = monotonic
        self._cached: Token | None = None
        self._inflight: asyncio.Future[Token] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._static_stamp: tuple[int, int, float] | None = None

    @property
    def expires_at(self) -> float | None:
        return self._cached.expires_at if self._cached else None

    def _fresh(self, tok: Token | None, margin: float) -> bool:
        if tok is None or not tok.value:
            return False
        if tok.deadline is not None and tok.deadline - margin <= self._monotonic():
            return False
        return tok.expires_at is None or tok.expires_at - margin > self._clock()

    async def token(self) -> str:
        if self.cfg.kind == "static":
            return (await self._static()).value
        if self._fresh(self._cached, self.cfg.refresh_margin):
            assert self._cached is not None
            return self._cached.value
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh())
            self._inflight.add_done_callback(self._landed)
        try:
            return (await asyncio.shield(self._inflight)).value
        except RelayError:
            # A failed early refresh is not fatal while the old token is still valid.
            if self._fresh(self._cached, 0.0):
                assert self._cached is not None
                return self._cached.value
            raise

    def _landed(self, fut: asyncio.Future[Token]) -> None:
        self._inflight = None
        if not fut.cancelled() and fut.exception() is None:
            self._cached = fut.result()

    async def _static(self) -> Token:
        path = self.cfg.token_file
        assert path is not None
        try:
            st = await asyncio.to_thread(os.stat, path)
            stamp = (st.st_ino, st.st_size, st.st_mtime)
            if self._cached is None or stamp != self._static_stamp:
                self._cached = await asyncio.to_thread(read_static, path)
                self._static_stamp = stamp
        except (OSError, ValueError) as exc:
            raise OAuthError(f"token source {self.cfg.name}: cannot read token_file {path}: "
                             f"{getattr(exc, 'strerror', None) or type(exc).__name__}",
                             error="token_file",
                             hint="the process that refreshes the token must write it there "
                                  "(bare token, or JSON with access_token)") from None
        if not self._cached.value:
            raise OAuthError(f"token source {self.cfg.name}: token_file {path} is empty",
                             error="token_file", hint="check the process that writes it")
        if self._cached.expires_at is not None and self._cached.expires_at <= self._clock():
            raise OAuthError(f"token source {self.cfg.name}: the token in {path} has expired",
                             error="expired",
                             hint="the process that refreshes token_file is not running")
        return self._cached

    async def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ca = self.cfg.ca_file
            self._ssl = await asyncio.to_thread(
                ssl.create_default_context, cafile=str(ca) if ca else None)
        return self._ssl

    async def _fields(self) -> dict[str, str]:
        cfg = self.cfg
        fields = {"client_id": cfg.client_id}
        if cfg.kind == "client_credentials":
            fields.update(grant_type="client_credentials", scope=cfg.scope)
            if cfg.certificate_file and cfg.certificate_key_file:
                cert, key = cfg.certificate_file, cfg.certificate_key_file
                fields["client_assertion_type"] = ASSERTION_TYPE
                fields["client_assertion"] = await asyncio.to_thread(
                    lambda: client_assertion(cfg, cert.read_bytes(), key.read_bytes(),
                                             now=time.time()))
            elif cfg.client_secret is not None:
                fields["client_secret"] = cfg.client_secret.reveal()
            return fields
        path = cfg.refresh_token_file
        assert path is not None
        try:
            refresh = (await asyncio.to_thread(path.read_text, encoding="utf-8")).strip()
        except OSError as exc:
            raise OAuthError(f"token source {cfg.name}: cannot read refresh_token_file {path}: "
                             f"{exc.strerror}", error="refresh_token_file",
                             hint="put the refresh token from the initial consent there") from None
        if not refresh:
            raise OAuthError(f"token source {cfg.name}: refresh_token_file {path} is empty",
                             error="refresh_token_file",
                             hint="put the refresh token from the initial consent there")
        fields.update(grant_type="refresh_token", refresh_token=refresh)
        if cfg.provider != "google" and cfg.scope:
            fields["scope"] = cfg.scope
        if cfg.client_secret is not None:
            fields["client_secret"] = cfg.client_secret.reveal()
        return fields

    async def _refresh(self) -> Token:
        cfg = self.cfg
        fields = await self._fields()
        started, started_mono = self._clock(), self._monotonic()
        try:
            resp = await post_form(cfg.token_url, fields, transport=self._transports.via(cfg.via),
                                   timeout=cfg.request_timeout,
                                   ssl_context=await self._context())
        except HttpProtocolError as exc:
            raise OAuthError(f"token source {cfg.name}: bad HTTP response from "
                             f"{cfg.token_url}: {exc}", error="http",
                             hint="check token_url points at the token endpoint") from None
        except TransportError as exc:
            raise OAuthError(f"token source {cfg.name}: cannot reach the token endpoint "
                             f"{cfg.token_url}: {exc}", error=exc.reason,
                             hint=exc.hint) from exc
        data: object = None
        with contextlib.suppress(ValueError):
            data = json.loads(resp.body.decode("utf-8", "replace"))
        if resp.status != 200 or not isinstance(data, dict) or "error" in data:
            err = token_error(resp.status, resp.body, source=cfg.name, url=cfg.token_url)
            log.warning("%s", err.explain())
            raise err
        value = data.get("access_token")
        if not isinstance(value, str) or not value:
            raise OAuthError(f"token source {cfg.name}: response has no access_token",
                             error="no_token", hint="check token_url")
        expires_in = data.get("expires_in")
        try:
            expires_at = started + float(expires_in) if expires_in is not None else None
        except (TypeError, ValueError):
            expires_at = None
        if expires_at is None:
            expires_at = jwt_expiry(value) or started + 3600.0
        rotated = data.get("refresh_token")
        if cfg.kind == "refresh_token" and isinstance(rotated, str) and rotated and \
                rotated != fields.get("refresh_token"):
            assert cfg.refresh_token_file is not None
            await asyncio.to_thread(write_private, cfg.refresh_token_file, rotated + "\n")
            log.info("token source %s: refresh token rotated; saved to %s", cfg.name,
                     cfg.refresh_token_file)
        log.info("token source %s: new access token, expires in %.0fs", cfg.name,
                 expires_at - self._clock())
        return Token(value, expires_at, started_mono + (expires_at - started))


class TokenSources:
    """Every configured token source by name; ``token(name)`` is what AUTH calls."""

    def __init__(self, configs: Sequence[TokenSourceConfig], *, transports: Transports,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._transports = transports
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._sources: dict[str, TokenSource] = {}
        self.reconfigure(configs)

    def reconfigure(self, configs: Sequence[TokenSourceConfig],
                    *, transports: Transports | None = None) -> None:
        """Swap in new configs; unchanged sources keep their cached tokens."""
        if transports is not None:
            self._transports = transports
        sources: dict[str, TokenSource] = {}
        for cfg in configs:
            old = self._sources.get(cfg.name)
            if old is not None and old.cfg == cfg and transports is None:
                sources[cfg.name] = old
            else:
                sources[cfg.name] = TokenSource(cfg, transports=self._transports,
                                                clock=self._clock, monotonic=self._monotonic)
        if self._metrics is not None:
            for name in self._sources.keys() - sources.keys():
                with contextlib.suppress(KeyError):
                    self._metrics.oauth_token_expiry.remove(name)
            for name, src in sources.items():
                self._metrics.oauth_token_expiry.labels(name).set_function(
                    self._remaining(src))
        self._sources = sources

    def _remaining(self, src: TokenSource) -> Callable[[], float]:
        def seconds() -> float:
            at = src.expires_at
            return at - self._clock() if at is not None else 0.0
        return seconds

    def names(self) -> list[str]:
        return list(self._sources)

    def expires_at(self, name: str) -> float | None:
        return self._source(name).expires_at

    def _source(self, name: str) -> TokenSource:
        try:
            return self._sources[name]
        except KeyError:
            raise OAuthError(f"no token source named {name!r}", error="config",
                             hint="the upstream's or account's token_source must name a "
                                  "[[token_source]]") from None

    async def token(self, name: str) -> str:
        """A valid access token for source ``name`` (cached; refreshed before expiry)."""
        return await self._source(name).token()
