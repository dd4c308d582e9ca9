"""DKIM canonicalisation and hashing over whole ``bytes``: dkimpy's results at C speed.

dkimpy (``dkim.rfc822_parse``, ``dkim.canonicalization``) splits the whole message into
lines with a regular expression and canonicalises with more of them: about 1 ms of CPU
for a 100 KB message before any hashing. Here each step is a few ``bytes`` methods
(``find``, ``replace``, ``count``, ``rstrip``), which run in C over the whole buffer, and
``hashlib`` (OpenSSL) hashes the result. Every function returns exactly what its dkimpy
counterpart returns (tests/dkim/test_canon.py compares them on generated messages), so a
signature made with these is the one dkimpy would make.

The body functions take any bytes (dkimpy's give the same answer for bare LFs and lone
CRs); a message's body is normally what ``split`` returns, with CRLF line breaks.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

__all__ = ["body_hash", "body_of", "header_digest", "relaxed_body", "relaxed_headers",
           "select_headers", "simple_body", "simple_headers", "split"]

Field = Sequence[bytes]            # [name, value] as dkimpy's parser gives it


def split(data: bytes) -> tuple[bytes, bytes]:
    """(header block, body) as ``dkim.rfc822_parse`` divides them.

    The header block ends with the last header line's line break (parse it for the
    fields); the body is everything after the first empty line, with each line break
    (LF or CRLF) written CRLF. A message without an empty line has an empty body.
    """
    if data[:1] == b"\n":
        return b"", body_of(data[1:])
    if data[:2] == b"\r\n":
        return b"", body_of(data[2:])
    crlf = data.find(b"\n\r\n")
    lf = data.find(b"\n\n", 0, len(data) if crlf < 0 else crlf + 1)   # only an earlier one
    if lf >= 0:
        return data[:lf + 1], body_of(data[lf + 2:])
    if crlf >= 0:
        return data[:crlf + 1], body_of(data[crlf + 3:])
    return data, b""


def body_of(rest: bytes) -> bytes:
    """``rest`` with every line break (LF or CRLF) written CRLF; a lone CR stays."""
    if rest.count(b"\n") == rest.count(b"\r\n"):
        return rest
    return rest.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _strip_trailing_lines(body: bytes) -> bytes:
    """dkimpy's ``strip_trailing_lines``: trailing CRLFs cut to one; one added if none."""
    if not body.endswith(b"\r\n"):
        return body + b"\r\n"
    tail = body[len(body.rstrip(b"\r\n")):]
    # ``tail`` is CRs and LFs ending in CRLF. After its last doubled CR or LF it
    # alternates, so that stretch is the run of CRLF pairs (less a leading LF).
    after = max(tail.rfind(b"\r\r"), tail.rfind(b"\n\n")) + 1
    pairs = (len(tail) - after) & ~1
    return body[:len(body) - pairs + 2]


def simple_body(body: bytes) -> bytes:
    """RFC 6376 3.4.3 as dkimpy does it (an empty body becomes one CRLF)."""
    return _strip_trailing_lines(body)


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 as dkimpy does it: WSP runs to one space, none at line ends.

    dkimpy strips ``[\\t ]+`` before each CRLF and then compresses runs; compressing
    first and then dropping the single space left before a CRLF gives the same bytes.
    """
    # Single-byte tests are memchr (tens of GB/s): base64 bodies skip the rest.
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    if b" " in body:
        while b"  " in body:
            body = body.replace(b"  ", b" ")      # halves every run: log2(longest) passes
        if b" \r\n" in body:
            body = body.replace(b" \r\n", b"\r\n")
    body = _strip_trailing_lines(body)
    return b"" if body == b"\r\n" else body


def body_hash(body: bytes, *, relaxed: bool = True, algorithm: str = "sha256") -> bytes:
    """The ``bh=`` value (base64) of a body as ``split`` returns it."""
    canon = relaxed_body(body) if relaxed else simple_body(body)
    return base64.b64encode(hashlib.new(algorithm, canon).digest())


def select_headers(headers: Sequence[Field], include: Sequence[bytes]) -> list[Field]:
    """dkimpy's ``select_headers``: for each name in ``include`` the next field upwards."""
    lowered = [h[0].lower() for h in headers]
    chosen: list[Field] = []
    last: dict[bytes, int] = {}
    for name in include:
        i = last.get(name, len(headers))
        while i > 0:
            i -= 1
            if lowered[i] == name:
                chosen.append(headers[i])
                break
        last[name] = i
    return chosen


def _relaxed_value(value: bytes) -> bytes:
    if b"\n" in value:
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    if b"\t" in value:
        value = value.replace(b"\t", b" ")
    while b"  " in value:
        value = value.replace(b"  ", b" ")
    return value.strip()


def relaxed_headers(fields: Sequence[Field]) -> bytes:
    """The selected fields, relaxed (RFC 6376 3.4.2), concatenated as they are hashed."""
    return b"".join(f[0].lower().rstrip() + b":" + _relaxed_value(f[1]) + b"\r\n"
                    for f in fields)


def simple_headers(fields: Sequence[Field]) -> bytes:
    """The selected fields unchanged (RFC 6376 3.4.1), concatenated as they are hashed."""
    return b"".join(f[0] + b":" + f[1] for f in fields)


def header_digest(signed: bytes, name: bytes, value: bytes, *, relaxed: bool = True,
                  algorithm: str = "sha256") -> bytes:
    """The digest the signature covers: the signed fields, then the signature field.

    ``value`` is the DKIM-Signature field's value with an empty ``b=``; as in dkimpy, its
    trailing CRLF (and, relaxed, trailing whitespace) is not hashed.
    """
    if relaxed:
        last = name.lower().rstrip() + b":" + _relaxed_value(value)
    else:
        last = name + b":" + value
        if last.endswith(b"\r\n"):
            last = last[:-2]
    return hashlib.new(algorithm, signed + last).digest()
