"""Message structure: refuse at end of DATA what a provider would bounce or drop later.

Sans-IO and one pass over the bytes already in memory: ``inspect(data, start=...)``
reads the header section line by line (it is small), and the body only with C-level
``bytes`` searches (NUL, line length) and, where the message declares MIME, the
boundaries and base64 parts it names. It returns the message's ``Shape`` (the fields
later steps use: ownership, missing Date/Message-ID) or raises ``Refusal`` with
``reason="structure"`` and a reply naming the fault and its line::

    550 5.6.0 message has no From: header field
    550 5.6.0 line 12 is 1,200 octets; RFC 5322 allows 998
    552 5.3.4 header section is 1,048,600 bytes; this listener allows 256 KB

Which checks run is a set of names (``relay.config.schema.STRUCTURE_CHECKS``); the
levels ``standard`` (RFC 5322 itself) and ``strict`` (plus ``to`` and ``mime``, what
providers add) are ``STRUCTURE_LEVELS``. Lines are counted from the client's first line:
``start`` skips relay's own ``Received:`` field, which the listener put on top.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from email import _header_value_parser as hvp
from email import errors as email_errors
from email.message import Message

from relay.verdict import Refusal

MAX_LINE = 998                       # RFC 5322 2.1.1, without the CRLF
MAX_MIME_DEPTH = 32
SINGLE = (b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc", b"subject", b"message-id",
          b"in-reply-to", b"references", b"date")       # RFC 5322 3.6: at most once
ADDRESS_FIELDS = (b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc")
_KEEP = (*ADDRESS_FIELDS, b"content-type", b"content-transfer-encoding")
_NAMES = {n: n.decode().title().replace("Id", "ID") for n in SINGLE}

_FTEXT = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")
# The common address forms, recognised without the full RFC 5322 parser (which costs
# tens of microseconds a field): addr-spec, <addr-spec>, simple or quoted names.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR = rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
_MAILBOX = rf"(?:{_ADDR}|(?:(?:{_ATOM}(?:[ \t]+{_ATOM})*|\"[^\"\\@]*\")[ \t]*)?<{_ADDR}>)"
_SIMPLE_LIST = re.compile(rf"[ \t]*{_MAILBOX}(?:[ \t]*,[ \t]*{_MAILBOX})*[ \t]*")
_ADDR_TOKEN = re.compile(_ADDR)
_B64_BLANKS = b" \t\r\n"


@dataclass(slots=True)
class Shape:
    """What the header scan found (offsets into the data given to ``inspect``)."""

    start: int                                    # first byte of the client's message
    head_end: int                                 # the empty line ending the header
    body_at: int                                  # first byte of the body
    counts: dict[bytes, int] = field(default_factory=dict)     # lower-case name → count
    values: dict[bytes, list[str]] = field(default_factory=dict)  # unfolded, _KEEP only
    addresses: dict[bytes, list[str]] = field(default_factory=dict)  # parsed, ADDRESS_FIELDS
    unreadable: set[bytes] = field(default_factory=set)   # address fields that do not parse

    def has(self, name: bytes) -> bool:
        return self.counts.get(name, 0) > 0


def _refuse(text: str, code: int = 550, enhanced: str = "5.6.0") -> Refusal:
    return Refusal(code, enhanced, text, reason="structure")


def fmt_size(n: int) -> str:
    """``262144`` → ``256 KB`` when exact, else ``1,048,600 bytes``."""
    for unit, size in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n:,} bytes"


def own_trace_end(data: bytes) -> int:
    """Where the client's message starts: after relay's own ``Received:`` field on top.

    Found by its own shape (``... (relay) with PROTO;`` then the date line), not by
    folding: a client whose first line starts with a blank must not pass for part of it.
    """
    if not data.startswith(b"Received: from "):
        return 0
    by = data.find(b" (relay) with ")
    by_end = data.find(b"\r\n", by) if by >= 0 else -1
    date_end = data.find(b"\r\n", by_end + 2) if by_end >= 0 else -1
    return 0 if date_end < 0 else date_end + 2


def inspect(data: bytes, *, start: int = 0, checks: Collection[str],
            smtputf8: bool = False, max_header_size: int = 256 * 1024,
            size_by: str = "this listener") -> Shape:
    """Scan one CRLF message; raise ``Refusal`` for the first enabled check it fails."""
    n = len(data)
    on = checks.__contains__

    def line_of(pos: int) -> int:
        return data.count(b"\r\n", start, pos) + 1

    if data.startswith(b"\r\n", start) or start >= n:
        if on("header-section"):
            raise _refuse("message is empty" if start >= n else
                          "message has no header section (it starts with an empty line)")
        return Shape(start, start, min(start + 2, n))
    blank = data.find(b"\r\n\r\n", start)
    head_end, body_at = (blank + 2, blank + 4) if blank >= 0 else (n, n)
    if on("header-size") and head_end - start > max_header_size:
        raise _refuse(f"header section is {head_end - start:,} bytes; {size_by} allows "
                      f"{fmt_size(max_header_size)}", 552, "5.3.4")
    if on("nul") and (nul := data.find(b"\0", start)) >= 0:
        raise _refuse(f"line {line_of(nul)} contains a NUL byte")
    if on("line-length") and (long_at := _long_line(data, start)) >= 0:
        end = data.find(b"\r\n", long_at)
        length = (n if end < 0 else end) - long_at
        raise _refuse(f"line {line_of(long_at)} is {length:,} octets; RFC 5322 allows "
                      f"{MAX_LINE}")
    head = data[start:head_end]
    if on("8bit-headers") and not smtputf8 and not head.isascii():
        at = next(i for i, b in enumerate(head) if b > 0x7F)
        raise _refuse(f"line {line_of(start + at)} of the header has 8-bit bytes; send the "
                      "message with SMTPUTF8 or encode them (RFC 2047)", 550, "5.6.7")
    shape = Shape(start, head_end, body_at)
    _fields(shape, head, on("field-names"))
    _header_rules(shape, on)
    if on("mime") and (shape.has(b"content-type") or
                       shape.has(b"content-transfer-encoding")):
        _mime(data, shape.values, body_at, n, "", 0)
    return shape


def _long_line(data: bytes, start: int) -> int:
    """Offset of the first line longer than MAX_LINE octets, or -1.

    Jumps from line start to line start through windows of MAX_LINE + 2 bytes: a window
    without a LF means the line it starts is too long; otherwise every line ending inside
    it is short, and the scan resumes after the last LF in it (a C ``rfind``).
    """
    n, p, width, rfind = len(data), start, MAX_LINE + 2, data.rfind
    while p + width <= n:
        q = rfind(b"\n", p, p + width)
        if q < 0:
            return p
        p = q + 1
    return -1


def _fields(shape: Shape, head: bytes, check_names: bool) -> None:
    """Count fields and keep the unfolded values of the ones later checks read."""
    counts, values = shape.counts, shape.values
    keep: list[bytes] | None = None
    for i, line in enumerate(head.split(b"\r\n")[:-1], 1):
        if line[:1] in (b" ", b"\t"):
            if i == 1 and check_names:
                raise _refuse("line 1 is a continuation line; the header must start with "
                              "a field")
            if keep is not None:
                keep.append(line)
            continue
        colon = line.find(b":")
        name = line[:colon] if colon > 0 else b""
        if check_names and not _FTEXT.match(name):
            raise _refuse(_bad_name(i, line, name))
        key = name.rstrip(b" \t").lower()
        counts[key] = counts.get(key, 0) + 1
        if key in _KEEP:
            if keep is not None:
                _store(values, keep)
            keep = [key, line[colon + 1:]]
        elif keep is not None:
            _store(values, keep)
            keep = None
    if keep is not None:
        _store(values, keep)


def _store(values: dict[bytes, list[str]], keep: list[bytes]) -> None:
    values.setdefault(keep[0], []).append(
        b"".join(keep[1:]).decode("utf-8", "replace").strip(" \t"))


def _quoted(raw: bytes) -> str:
    text = raw[:40].decode("ascii", "replace")
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else "?" for c in text) + '"'


def _bad_name(i: int, line: bytes, name: bytes) -> str:
    if not name:
        return (f"line {i} is neither a header field nor the empty line that ends the "
                f"header ({_quoted(line)} has no colon)")
    if name.rstrip(b" \t") != name and _FTEXT.match(name.rstrip(b" \t")):
        return (f"line {i}: header field name {_quoted(name.rstrip())} has a space before "
                "the colon")
    return f"line {i}: header field name {_quoted(name)} is not printable ASCII"


def _header_rules(shape: Shape, enabled: Callable[[str], bool]) -> None:
    """Which fields occur how often, and whether the address fields parse."""
    counts = shape.counts
    if enabled("from") and not counts.get(b"from"):
        raise _refuse("message has no From: header field")
    if enabled("singletons"):
        for name in SINGLE:
            if counts.get(name, 0) > 1:
                raise _refuse(f"message has {counts[name]} {_NAMES[name]}: header fields; "
                              "RFC 5322 allows one")
    if enabled("to") and not counts.get(b"to"):
        raise _refuse("message has no To: header field")
    check = enabled("addresses")
    for name in ADDRESS_FIELDS:
        for value in shape.values.get(name, ()):
            found, problem = parse_addresses(value)
            if problem is None and name in (b"from", b"sender") and not found:
                problem = "it names no mailbox"
            if problem is None and name == b"sender" and len(found) > 1:
                problem = "it names more than one mailbox"
            if problem is not None:
                if check:
                    raise _refuse(f"{_NAMES[name]}: header field is not a valid address list "
                                  f"({problem})")
                shape.unreadable.add(name)
            shape.addresses.setdefault(name, []).extend(found)


def parse_addresses(value: str) -> tuple[list[str], str | None]:
    """The addresses of an address-list field value, and what is wrong with it (or None)."""
    if not value:
        return [], None
    if _SIMPLE_LIST.fullmatch(value):
        return _ADDR_TOKEN.findall(value), None
    try:
        parsed, rest = hvp.get_address_list(value)
    except (email_errors.HeaderParseError, IndexError, ValueError) as exc:
        return [], str(exc) or "cannot be parsed"
    if rest:
        return [], f"unexpected text {rest[:30]!r}"
    bad = [d for d in parsed.all_defects if not isinstance(d, email_errors.ObsoleteHeaderDefect)]
    if bad:
        return [], str(bad[0])
    out = []
    for m in parsed.all_mailboxes:
        if not m.local_part or not m.domain:
            return [], f"{m.local_part or ''!s}@{m.domain or ''!s} is not an address"
        out.append(f"{m.local_part}@{m.domain}")
    return out, None


def _content(values: dict[bytes, list[str]]) -> tuple[Message, str]:
    m = Message()
    for v in values.get(b"content-type", ())[:1]:
        m["Content-Type"] = v
    cte = next(iter(values.get(b"content-transfer-encoding", ())), "").strip().lower()
    return m, cte


def _mime(data: bytes, values: dict[bytes, list[str]], body: int, end: int, where: str,
          depth: int) -> None:
    """A declared multipart needs its boundary and closing delimiter; base64 must decode."""
    msg, cte = _content(values)
    ctype = msg.get_content_type()
    if msg.get_content_maintype() == "multipart":
        if depth >= MAX_MIME_DEPTH:
            raise _refuse(f"{_at(where)}MIME parts nested deeper than {MAX_MIME_DEPTH}")
        boundary = msg.get_boundary()
        if not boundary:
            raise _refuse(f"{_at(where)}Content-Type: {ctype} has no boundary parameter")
        for i, (p_start, p_end) in enumerate(_parts(data, body, end, boundary, where, ctype)):
            part_values, p_body = _part_header(data, p_start, p_end)
            _mime(data, part_values, p_body, p_end, f"{where}.{i + 1}".lstrip("."), depth + 1)
    elif cte == "base64":
        raw = data[body:end].translate(None, _B64_BLANKS)
        try:
            binascii.a2b_base64(raw, strict_mode=True)
        except binascii.Error as exc:
            what = f"part {where} ({ctype})" if where else f"message body ({ctype})"
            raise _refuse(f"{what} is declared base64 but does not decode: {exc}") from None


def _at(where: str) -> str:
    """``part 1.2: `` for a body part, nothing for the message itself."""
    return f"part {where}: " if where else ""


def _parts(data: bytes, body: int, end: int, boundary: str,
           where: str, ctype: str) -> list[tuple[int, int]]:
    """(start, end) of each body part between the delimiters of ``boundary``."""
    delim = b"\r\n--" + boundary.encode("ascii", "replace")
    # the first delimiter may be the body's very first line (no CRLF before it)
    pos = body - 2 if data.startswith(delim[2:], body) else data.find(delim, body, end)
    spans: list[tuple[int, int]] = []
    while pos >= 0:
        after = pos + len(delim)
        if data.startswith(b"--", after):
            if spans and spans[-1][1] < 0:
                spans[-1] = (spans[-1][0], pos)
            return spans
        line_end = data.find(b"\r\n", after, end)
        if line_end >= 0 and not data[after:line_end].strip(b" \t"):
            if spans and spans[-1][1] < 0:
                spans[-1] = (spans[-1][0], pos)
            spans.append((line_end + 2, -1))
        pos = data.find(delim, after, end)
    raise _refuse(f"{_at(where)}{ctype} body has no closing boundary \"--{boundary}--\"")


def _part_header(data: bytes, start: int, end: int) -> tuple[dict[bytes, list[str]], int]:
    if data.startswith(b"\r\n", start):
        return {}, start + 2
    blank = data.find(b"\r\n\r\n", start, end)
    head_end, body = (blank + 2, blank + 4) if blank >= 0 else (end, end)
    shape = Shape(start, head_end, body)
    _fields(shape, data[start:head_end] + (b"" if blank >= 0 else b"\r\n"), False)
    return shape.values, body
