"""DKIM signing: relaxed/relaxed, over-signed identity headers, RSA/Ed25519 via cryptography.

relay's own field splitter parses the header; canonicalisation, header selection and
hashing are ``relay.dkim.canon`` (bytes operations in C, dkimpy's exact results) and the
public-key step is ``cryptography`` (OpenSSL), about twenty times faster than dkimpy's
pure-Python RSA. Signing is the last change relay makes to a message: the signature
headers are prepended and nothing else is touched.

Signing never skips silently: trusted mail whose ``From:`` names a domain with a key is
signed, or refused (``550 5.7.0`` when the message cannot be signed: a header line that is
no field, several ``From:`` fields, a ``From:`` that cannot be read; ``451 4.7.0`` when
signing itself failed), or, only where the operator chose ``on_failure = "send-unsigned"``
for the domain, sent unsigned with a warning and ``relay_dkim_signatures{result="failed"}``.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from relay.dkim import canon
from relay.dkim.canon import relaxed_body
from relay.dkim.keys import DkimKey, DkimKeys, load_keys
from relay.envelope import Envelope
from relay.errors import DkimError
from relay.headers import split
from relay.metrics import Metrics
from relay.offload import Worker
from relay.verdict import Refusal

__all__ = ["OVERSIGNED", "SIGNED_HEADERS", "DkimKeys", "Signer", "from_domain", "load_keys",
           "relaxed_body"]

log = logging.getLogger("relay.dkim")
_SIGNING = Worker("relay-dkim")        # one per process: RSA runs beside the event loop
_AT_DOMAIN = re.compile(r"@\s*([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)")
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")

# Signed when present, in this order (the list).
SIGNED_HEADERS: tuple[str, ...] = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
    "references", "mime-version", "content-type")
# Signed once more than they occur, so that adding one later breaks the signature.
OVERSIGNED: frozenset[str] = frozenset({
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
    "references"})
# Also signed (as absent) when missing: nobody downstream may add these. Date,
# Message-ID and To are left out on purpose: a provider may legitimately add a missing
# one (e.g. "To: undisclosed-recipients:;"), which must not break the signature.
OVERSIGNED_ABSENT: tuple[str, ...] = ("from", "cc", "subject", "reply-to")

_PKCS1 = padding.PKCS1v15()
_PREHASHED = Prehashed(hashes.SHA256())
_LINE_WIDTH = 76


_FIELD_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")      # RFC 5322 ftext
_LINE_END = re.compile(rb"\r?\n")


def parse(data: bytes, *, crlf: bool = False) -> tuple[list[list[bytes]], bytes]:
    """Header fields ``[name, value]`` and the CRLF body, as a DKIM verifier reads them.

    relay's own field splitter (``relay.headers.split``), not dkimpy's ``rfc822_parse``,
    which gives up on a field with blanks before its colon (``Subject : hi``, obsolete
    but legal RFC 5322 4.5 syntax that verifiers read): relay used to leave such mail
    unsigned without a trace. The name is given without those blanks (relaxed
    canonicalisation drops them anyway); a line that is no field at all raises DkimError.

    ``crlf``: the caller knows every line ends in CRLF (relay's DATA reader refuses bare
    CR and LF), which spares two scans of the whole message (0.12 ms at 100 KB).
    """
    if not crlf and data.count(b"\n") != data.count(b"\r\n"):
        data = _LINE_END.sub(b"\r\n", data)
    fields, body_at = split(data)
    headers: list[list[bytes]] = []
    for f in fields:
        if not _FIELD_NAME.match(f.name):
            shown = f.raw.split(b"\r\n", 1)[0][:40].decode("ascii", "replace")
            raise DkimError(f"the header line {shown!r} is not a header field; a DKIM "
                            "signature over it would not verify",
                            hint="the client sent a malformed header; fix the sending "
                                 "software, or turn structure checks on to refuse it")
        headers.append([f.name, f.raw[f.raw.index(b":") + 1:]])
    body = data[body_at + 2:] if data[body_at:body_at + 2] == b"\r\n" else b""
    return headers, body


def from_domain(data: bytes) -> str | None:
    """The domain of the (first) From header address, lower-case; None if there is none."""
    values = [f.raw[f.raw.index(b":") + 1:].decode("utf-8", "replace")
              for f in split(data)[0] if f.name.lower() == b"from"]
    if len(values) != 1:
        return None        # no From, or several: not something to sign (RFC 5322 3.6)
    for _name, addr in getaddresses([" ".join(values[0].split())]):
        if "@" in addr:
            return addr.rsplit("@", 1)[1].strip().rstrip(".").lower() or None
    return None


def header_list(headers: Sequence[Sequence[bytes]]) -> list[bytes]:
    """The h= names: the issue's headers present (bottom-up), identity ones over-signed."""
    present: dict[str, int] = {}
    for h in headers:
        name = h[0].decode("ascii", "replace").lower().strip()
        present[name] = present.get(name, 0) + 1
    out: list[str] = []
    for name in SIGNED_HEADERS:
        n = present.get(name, 0)
        extra = 1 if (name in OVERSIGNED and n) or (n == 0 and name in OVERSIGNED_ABSENT) else 0
        out += [name] * (n + extra)
    return [n.encode("ascii") for n in out]


def _fold_list(prefix: str, items: Sequence[str], sep: str, linesep: str) -> str:
    """``prefix`` followed by items joined by ``sep``, folded before ``_LINE_WIDTH``."""
    lines = [prefix]
    for i, item in enumerate(items):
        piece = item + (sep if i < len(items) - 1 else "")
        if len(lines[-1]) + len(piece) > _LINE_WIDTH:
            lines.append("\t" + piece)
        else:
            lines[-1] += piece
    return linesep.join(lines)


def _fold_b64(value: str, first: int, linesep: str) -> str:
    chunks = [value[:first]]
    rest = value[first:]
    while rest:
        chunks.append(rest[:_LINE_WIDTH - 1])
        rest = rest[_LINE_WIDTH - 1:]
    return (linesep + "\t").join(chunks)


@dataclass(frozen=True, slots=True)
class _ToSign:
    domain: str                                 # the key domain
    linesep: str
    heads: list[tuple[DkimKey, str, bytes]]     # key, header up to "b=", digest to sign


class Unsignable(Exception):
    """A From: names ``domain``, which has a key, but the message cannot be signed for it."""

    def __init__(self, domain: str, reason: str) -> None:
        super().__init__(f"{domain}: {reason}")
        self.domain = domain
        self.reason = reason


class Signer:
    """Signs trusted mail whose From domain (or a parent, DMARC-relaxed) has a key."""

    def __init__(self, keys: DkimKeys, *, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 on_failure: Mapping[str, str] | None = None) -> None:
        self.keys = keys
        self._metrics = metrics
        self._clock = clock
        self._on_failure = dict(on_failure or {})     # key domain → refuse | send-unsigned

    def signing_domain(self, sender_domain: str | None) -> str | None:
        """The configured key domain aligned with ``sender_domain`` (itself or a parent)."""
        if not sender_domain:
            return None
        labels = sender_domain.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):
            candidate = ".".join(labels[i:])
            if self.keys.for_domain(candidate):
                return candidate
        return None

    def should_sign(self, envelope: Envelope, data: bytes) -> bool:
        """Only mail from trusted clients whose From domain has an aligned key is signed."""
        return envelope.trusted and self.signing_domain(from_domain(data)) is not None

    def sign(self, data: bytes, *, sender_domain: str, crlf: bool = False) -> bytes:
        """The message with one DKIM-Signature per key of the aligned domain prepended.

        Blocking (the public-key step): call ``sign_async`` from the event loop.
        """
        todo = self._prepare(data, sender_domain, crlf)
        return self._assemble(todo, self._raw(todo), data)

    async def sign_async(self, data: bytes, *, sender_domain: str,
                         crlf: bool = False) -> bytes:
        """``sign`` with only the public-key step on the worker thread. The rest is bytes
        operations in C (tens of microseconds); the RSA step (about 0.25 ms) releases the
        GIL, so a worker thread that needs the GIL only to start it and hand the result
        back leaves the event loop alone. Moving the whole signature there cost more CPU
        in GIL hand-offs than the work it moved."""
        todo = self._prepare(data, sender_domain, crlf)
        return self._assemble(todo, await _SIGNING.run(lambda: self._raw(todo)), data)

    def _prepare(self, data: bytes, sender_domain: str, crlf: bool) -> _ToSign:
        domain = self.signing_domain(sender_domain)
        if domain is None:
            raise DkimError(f"no DKIM key for {sender_domain} or a parent domain",
                            hint="add a [[dkim]] key for the domain or do not sign its mail")
        headers, body = parse(data, crlf=crlf)
        first_end = data.find(b"\n")
        linesep = "\r\n" if first_end > 0 and data[first_end - 1:first_end] == b"\r" else "\n"
        include = header_list(headers)
        # select first, canonicalise only what is signed (not every Received line)
        signed = canon.relaxed_headers(canon.select_headers(headers, include))
        bh = canon.body_hash(body)
        timestamp = int(self._clock())
        heads = [self._unsigned(key, include, signed, bh, timestamp, linesep)
                 for key in self.keys.for_domain(domain)]  # the first key ends up on top
        return _ToSign(domain, linesep, heads)

    def _raw(self, todo: _ToSign) -> list[bytes]:
        """The public-key signatures (blocking: on the worker thread from the loop)."""
        try:
            return [key.private.sign(digest) if isinstance(key.private,
                                                           ed25519.Ed25519PrivateKey)
                    else key.private.sign(digest, _PKCS1, _PREHASHED)
                    for key, _, digest in todo.heads]   # Ed25519: RFC 8463, over the digest
        except Exception:
            self._count(todo.domain, "error")
            raise

    def _assemble(self, todo: _ToSign, sigs: list[bytes], data: bytes) -> bytes:
        out = []
        for (_, unsigned, _), sig in zip(todo.heads, sigs, strict=True):
            b64 = base64.b64encode(sig).decode("ascii")
            out.append(unsigned + _fold_b64(b64, _LINE_WIDTH - 3, todo.linesep) + todo.linesep)
            self._count(todo.domain, "signed")
        return "".join(out).encode("ascii") + data

    async def maybe_sign(self, envelope: Envelope, data: bytes, *, crlf: bool = False) -> bytes:
        """What the accept pipeline calls last: signed bytes, or ``data`` unchanged when the
        message is not trusted or its From: names no domain with a key.

        Raises ``Refusal`` (reason ``dkim``) when a keyed message cannot be signed, unless
        the domain's ``on_failure`` is ``send-unsigned`` (then: warning, metric, unsigned).
        """
        if not envelope.trusted:
            return data
        try:
            domain = self.keyed_from_domain(data)
        except Unsignable as exc:
            return self._failed(data, exc.domain, exc.reason, permanent=True)
        if domain is None:
            return data
        key_domain = self.signing_domain(domain) or domain
        try:
            return await self.sign_async(data, sender_domain=domain, crlf=crlf)
        except DkimError as exc:                 # the message: no retry will change it
            return self._failed(data, key_domain, str(exc), permanent=True)
        except Exception as exc:                 # signing itself (key, library): may pass
            log.exception("DKIM signing for %s failed", key_domain)
            return self._failed(data, key_domain, f"{type(exc).__name__}: {exc}",
                                permanent=False)

    def keyed_from_domain(self, data: bytes) -> str | None:
        """The From: domain to sign for, or None when no From: domain has a key.

        Raises ``Unsignable`` when a From: field names a keyed domain but the message
        cannot be signed for it (several From: fields, or one that does not parse): such
        mail must not leave unsigned by accident. An address in a display name
        (``"support@example.com via Zendesk" <noreply@zendesk.example>``) is not a From:
        domain: only when an address does not parse is the raw text searched for one.
        """
        values = [f.raw[f.raw.index(b":") + 1:].decode("utf-8", "replace")
                  for f in split(data)[0] if f.name.lower() == b"from"]
        parsed: list[str] = []
        unreadable = False
        for v in values:
            found = [a for _n, a in getaddresses([" ".join(v.split())]) if "@" in a]
            for addr in found:
                domain = addr.rsplit("@", 1)[1].strip().rstrip(".").lower()
                if _DOMAIN.fullmatch(domain):
                    parsed.append(domain)
                else:
                    unreadable = True
            unreadable = unreadable or not found
        keyed = [d for d in parsed if self.signing_domain(d)]
        if unreadable:
            keyed += [m.lower().rstrip(".") for v in values for m in _AT_DOMAIN.findall(v)
                      if self.signing_domain(m.lower().rstrip("."))]
        if not keyed:
            return None
        key_domain = self.signing_domain(keyed[0]) or keyed[0]
        if len(values) > 1:
            raise Unsignable(key_domain, f"the message has {len(values)} From: fields")
        target = next((d for d in parsed if self.signing_domain(d)), None)
        if target is None:
            raise Unsignable(key_domain, "its From: field cannot be read as an address")
        return target

    def _failed(self, data: bytes, domain: str, reason: str, *, permanent: bool) -> bytes:
        """Refuse, or (the operator's choice for the domain) send unsigned and say so."""
        if self._on_failure.get(domain) == "send-unsigned":
            self._count(domain, "failed")
            log.warning("DKIM: a message from %s is sent UNSIGNED: %s (on_failure = "
                        "\"send-unsigned\" for %s)", domain, reason, domain)
            return data
        self._count(domain, "refused")
        if permanent:
            raise Refusal(550, "5.7.0", f"message cannot be DKIM-signed for {domain}: "
                          f"{reason[:200]}", reason="dkim")
        raise Refusal(451, "4.7.0", f"DKIM signing for {domain} failed; try again later",
                      reason="dkim")

    def _unsigned(self, key: DkimKey, include: list[bytes], signed: bytes, bh: bytes,
                  timestamp: int, linesep: str) -> tuple[DkimKey, str, bytes]:
        """(key, the signature header up to ``b=``, the digest its key signs)."""
        names = [n.decode("ascii") for n in include]
        head = (f"DKIM-Signature: v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain};"
                f"{linesep}\ts={key.selector}; t={timestamp};{linesep}")
        h = _fold_list("\th=", names, ":", linesep) + ";" + linesep
        tail = f"\tbh={bh.decode('ascii')};{linesep}\tb="
        unsigned = head + h + tail
        value = unsigned.split(":", 1)[1].encode("ascii")
        return key, unsigned, canon.header_digest(signed, b"DKIM-Signature", value)

    def _count(self, domain: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.dkim_signatures.labels(domain=domain, result=result).inc()

