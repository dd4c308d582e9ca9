"""DKIM verification of every signature in a message (RFC 6376, RFC 8463 Ed25519).

Parsing, canonicalisation and header hashing are dkimpy's; keys come from the configured
resolver and the public-key check is done with ``cryptography`` (so Ed25519 needs no
extra package). Used by ``relay dkim verify`` and for inbound Authentication-Results.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from relay.dkim.sign import parse
from relay.errors import DnsError

Result = Literal["pass", "fail", "neutral", "none", "temperror", "permerror"]
TxtLookup = Callable[[str], list[bytes]]
MIN_RSA_BITS = 1024


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """One signature's outcome, in RFC 8601 terms."""

    domain: str
    selector: str
    algorithm: str
    result: Result
    reason: str = ""

    def __str__(self) -> str:
        text = f"dkim={self.result} header.d={self.domain or '?'} header.s={self.selector or '?'}"
        text += f" header.a={self.algorithm or '?'}"
        return f"{text} ({self.reason})" if self.reason else text


def _text(b: bytes) -> str:
    return b.decode("ascii", "replace")


def public_key(record: bytes) -> rsa.RSAPublicKey | ed25519.Ed25519PublicKey:
    """The key in a DKIM TXT record; ValueError with a reason when unusable."""
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList as exc:
        raise ValueError(f"key record is not a tag list: {exc}") from None
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        raise ValueError("key record version is not DKIM1")
    p = re.sub(rb"\s+", b"", tags.get(b"p", b""))
    if not p:
        raise ValueError("key is revoked (empty p=)")
    raw = base64.b64decode(p)
    kind = tags.get(b"k", b"rsa")
    if kind == b"ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    if kind != b"rsa":
        raise ValueError(f"unknown key type k={_text(kind)}")
    try:
        key = serialization.load_der_public_key(raw)
    except ValueError:        # a bare PKCS#1 RSAPublicKey, as some publish
        pem = b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(raw) + \
            b"-----END RSA PUBLIC KEY-----\n"
        key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("k=rsa record does not hold an RSA key")
    return key


def verify(data: bytes, *, lookup: TxtLookup) -> list[VerifyResult]:
    """Check every DKIM-Signature, topmost first; blocking (DNS), run it on a thread."""
    headers, body = parse(data)
    sigs = [(n, v) for n, v in headers if n.lower() == b"dkim-signature"]
    return [_verify_one(headers, body, (n, v), lookup) for n, v in sigs]


def _verify_one(headers: list[list[bytes]], body: bytes, sig_header: tuple[bytes, bytes],
                lookup: TxtLookup) -> VerifyResult:
    try:
        sig = parse_tag_value(sig_header[1])
    except InvalidTagValueList as exc:
        return VerifyResult("", "", "", "permerror", f"signature is not a tag list: {exc}")
    d, s, a = (_text(sig.get(k, b"")) for k in (b"d", b"s", b"a"))

    def res(result: Result, reason: str = "") -> VerifyResult:
        return VerifyResult(d, s, a, result, reason)

    try:
        dkim.validate_signature_fields(sig)
    except dkim.ValidationError as exc:
        return res("permerror", str(exc))
    if a not in ("rsa-sha256", "ed25519-sha256"):
        return res("permerror", f"algorithm {a} is not accepted (RFC 8301)")
    try:
        policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as exc:
        return res("permerror", f"invalid c= {exc}")
    cbody = policy.canonicalize_body(body)
    if b"l" in sig:
        cbody = cbody[:int(sig[b"l"])]
    bh = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
    if hashlib.sha256(cbody).digest() != bh:
        return res("fail", "body hash mismatch")
    include = [x.lower() for x in re.split(rb"\s*:\s*", sig[b"h"].strip())]
    if b"from" not in include:
        return res("permerror", "h= does not include From")
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, policy, policy.canonicalize_headers(headers), include,
                      sig_header, sig)
    digest = hasher.digest()
    name = f"{s}._domainkey.{d}"
    try:
        records = lookup(name)
    except DnsError as exc:
        return res("temperror", str(exc))
    if not records:
        return res("permerror", f"no key published at {name}")
    try:
        key = public_key(records[0])
    except ValueError as exc:
        return res("permerror", f"{name}: {exc}")
    signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            if a != "ed25519-sha256":
                return res("permerror", "key type ed25519 does not match a=")
            key.verify(signature, digest)
        else:
            if a != "rsa-sha256":
                return res("permerror", "key type rsa does not match a=")
            if key.key_size < MIN_RSA_BITS:
                return res("permerror", f"RSA key of {key.key_size} bits is too small")
            key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    except InvalidSignature:
        return res("fail", "signature does not verify (headers changed?)")
    return res("pass")


async def verify_async(data: bytes, *, lookup: TxtLookup) -> list[VerifyResult]:
    return await asyncio.to_thread(verify, data, lookup=lookup)


def authentication_results(results: list[VerifyResult], authserv_id: str,
                           linesep: bytes = b"\r\n") -> bytes:
    """``Authentication-Results:`` (RFC 8601) with one ``dkim=`` clause per signature."""
    clauses = []
    for r in results or [VerifyResult("", "", "", "none")]:
        if r.result == "none":
            clauses.append("dkim=none")
            continue
        reason = f' reason="{_quoted(r.reason)}"' if r.reason else ""
        clauses.append(f"dkim={r.result}{reason} header.d={r.domain or 'unknown'} "
                       f"header.s={r.selector or 'unknown'} header.a={r.algorithm or 'unknown'}")
    sep = linesep.decode()
    text = f"Authentication-Results: {authserv_id};{sep}\t" + f";{sep}\t".join(clauses) + sep
    return text.encode("ascii", "replace")


def _quoted(text: str) -> str:
    clean = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)[:200]
    return clean.replace("\\", "\\\\").replace('"', '\\"')
