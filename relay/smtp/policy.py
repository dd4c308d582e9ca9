"""Envelope address policy: parse MAIL/RCPT paths strictly and decide who may relay.

Addresses are judged as relay will later use them, so forms that other software reads
differently are refused instead of passed on: percent-hack (``user%other@domain``), bang
paths (``a!b@c``), quoted local parts holding ``@``, ``%``, ``!`` or backslashes, source
routes (``<@a,@b:user@c>``), and any control character (NUL, CR, LF, DEL...). Syntax
errors get ``501 5.1.3``; refused-but-well-formed forms get ``553 5.1.3``; non-ASCII
without ``SMTPUTF8`` gets ``553 5.6.7`` (RFC 6531).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from relay.smtp.replies import AUTH_REQUIRED, RELAY_DENIED, TOO_BIG, too_big
from relay.verdict import Refusal

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256
_MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", "AUTH"}

_ATEXT = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_LDH = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_PARAM_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_PARAM_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e]+$")   # printable, no "=" (RFC 5321 esmtp-value)


@dataclass(frozen=True, slots=True)
class Parsed:
    """A parsed MAIL FROM / RCPT TO argument."""

    address: str                      # "" for the null reverse-path <>
    params: dict[str, str | None]     # keyword (upper case) → value


def _bad(what: str, detail: str) -> Refusal:
    return Refusal(501, "5.1.3", f"Bad {what} address syntax: {detail}", reason="bad_address")


def _refused(what: str, detail: str) -> Refusal:
    return Refusal(553, "5.1.3", f"{what.capitalize()} address not accepted: {detail}",
                   reason="bad_address")


def parse_command(arg: str | None, keyword: str, *, what: str, null_ok: bool,
                  smtputf8: bool | None = None, local_limit: bool = True) -> Parsed:
    """Parse ``FROM:<path> params`` / ``TO:<path> params``.

    ``smtputf8=None`` means "decide from the parameters" (MAIL FROM); RCPT passes the
    transaction's SMTPUTF8 flag. ``local_limit=False`` leaves RFC 5321's 64-character
    local-part limit to ``local_part_refusal``, so that the listener can let a provider
    profile's own limit (which names the profile) speak first.
    """
    usage = "MAIL FROM:<address>" if keyword == "FROM:" else "RCPT TO:<address>"
    syntax = Refusal(501, "5.5.4", f"Syntax: {usage} [parameters]", reason="bad_address")
    if arg is None or arg[: len(keyword)].upper() != keyword:
        raise syntax
    text = arg[len(keyword):].lstrip(" ")
    if not text:
        raise syntax
    _check_chars(text, what)
    path, rest = _split_path(text, what)
    params = parse_params(rest)
    utf8 = ("SMTPUTF8" in params) if smtputf8 is None else smtputf8
    address = parse_path(path, what=what, null_ok=null_ok, smtputf8=utf8,
                         local_limit=local_limit)
    return Parsed(address, params)


# C0 controls and DEL; and the surrogates that decoding with surrogateescape leaves for
# bytes that were not UTF-8. One search in C, not a Python step per character.
_FORBIDDEN_CHAR = re.compile("[\x00-\x1f\x7f\udc80-\udcff]")


def _check_chars(text: str, what: str) -> None:
    found = _FORBIDDEN_CHAR.search(text)
    if found is None:
        return
    o = ord(found.group())
    if o >= 0xDC80:
        raise _bad(what, "invalid UTF-8")
    raise _bad(what, f"control character 0x{o:02x}")


def _split_path(text: str, what: str) -> tuple[str, str]:
    """Split ``<path> rest`` (angle brackets, honouring quotes) or ``bare@path rest``."""
    if not text.startswith("<"):
        path, _, rest = text.partition(" ")
        return path, rest
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            rest = text[i + 1:]
            if rest and not rest.startswith(" "):
                raise _bad(what, "text after '>'")
            return text[1:i], rest.strip(" ")
    raise _bad(what, "missing '>'")


def mail_params(params: dict[str, str | None], *, extended: bool,
                max_size: int, size_by: str = "") -> tuple[bool, bool]:
    """Check MAIL FROM parameters; return (SMTPUTF8, BODY=8BITMIME). AUTH= is ignored.

    ``size_by`` names who sets ``max_size`` in the refusal (``listener platform``).
    """
    if params and not extended:
        raise Refusal(501, "5.5.4", "Parameters need EHLO", reason="bad_address")
    unknown = sorted(set(params) - _MAIL_PARAMS)
    if unknown:
        raise Refusal(555, "5.5.4", f"MAIL parameter {unknown[0][:32]} not supported",
                      reason="bad_address")
    body = (params.get("BODY") or "7BIT").upper()
    if body not in ("7BIT", "8BITMIME"):
        raise Refusal(501, "5.5.4", "BODY must be 7BIT or 8BITMIME", reason="bad_address")
    if params.get("SMTPUTF8") is not None:
        raise Refusal(501, "5.5.4", "SMTPUTF8 takes no value", reason="bad_address")
    size = params.get("SIZE")
    if size is not None:
        if not size.isdigit() or len(size) > 20:
            raise Refusal(501, "5.5.4", "SIZE must be a number", reason="bad_address")
        if int(size) > max_size:
            reply = too_big(max_size, size_by) if size_by else TOO_BIG
            raise Refusal.from_reply(reply, "too_big")
    return "SMTPUTF8" in params, body == "8BITMIME"


def parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for token in text.split():
        key, eq, value = token.partition("=")
        if not _PARAM_KEY.match(key) or (eq and not _PARAM_VALUE.match(value)):
            raise Refusal(501, "5.5.4", f"Syntax error in parameter {key[:32]!r}",
                          reason="bad_address")
        params[key.upper()] = value if eq else None
    return params


def parse_path(path: str, *, what: str, null_ok: bool, smtputf8: bool,
               local_limit: bool = True) -> str:
    """Validate the mailbox inside the angle brackets; return it unchanged."""
    if path == "":
        if null_ok:
            return ""
        raise _bad(what, "empty address")
    if path.startswith("@"):
        raise _refused(what, "source routes are not accepted")
    if len(path) > MAX_PATH:
        raise _bad(what, f"longer than {MAX_PATH} characters")
    if not smtputf8 and not path.isascii():
        raise Refusal(553, "5.6.7", f"Non-ASCII {what} address requires SMTPUTF8",
                      reason="bad_address")
    if path.startswith('"'):
        local, after = _quoted_local(path, what)
    else:
        at = path.rfind("@")
        if at < 0:
            raise _bad(what, "no domain (use user@domain)")
        local, after = path[:at], path[at:]
        _dot_string(local, what)
    if not after.startswith("@"):
        raise _bad(what, "expected '@' after the local part")
    if local_limit and (refusal := local_part_refusal(path, what)) is not None:
        raise refusal
    _domain(after[1:], what)
    return path


def local_part_refusal(address: str, what: str) -> Refusal | None:
    """RFC 5321 4.5.3.1.1: a local part of at most 64 octets (None when it fits)."""
    local = address.rpartition("@")[0]
    if len(local) > MAX_LOCAL:
        return _bad(what, f"local part longer than {MAX_LOCAL} characters")
    return None


def _quoted_local(path: str, what: str) -> tuple[str, str]:
    i = 1
    while i < len(path):
        ch = path[i]
        if ch == "\\":
            raise _refused(what, "backslash in a quoted local part")
        if ch == '"':
            local = path[: i + 1]
            inner = local[1:-1]
            if any(c in inner for c in "@%!"):
                raise _refused(what, "quoted local part containing '@', '%' or '!'")
            return local, path[i + 1:]
        i += 1
    raise _bad(what, "unterminated quoted local part")


def _dot_string(local: str, what: str) -> None:
    if not local:
        raise _bad(what, "empty local part")
    if "%" in local:
        raise _refused(what, "percent-hack routing (%) is not accepted")
    if "!" in local:
        raise _refused(what, "bang-path routing (!) is not accepted")
    if "@" in local:
        raise _refused(what, "more than one '@'")
    for atom in local.split("."):
        if not atom:
            raise _bad(what, "empty atom in local part (leading, trailing or double dot)")
        for ch in atom:
            if ch not in _ATEXT and ch.isascii():
                raise _bad(what, f"character {ch!r} in local part")


def _domain(domain: str, what: str) -> None:
    if not domain:
        raise _bad(what, "empty domain")
    if len(domain) > MAX_DOMAIN:
        raise _bad(what, f"domain longer than {MAX_DOMAIN} characters")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise _bad(what, "unterminated address literal")
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise _bad(what, "invalid address literal") from None
        return
    for label in domain.split("."):
        if label.isascii():
            if not _LDH.match(label):
                raise _bad(what, f"invalid domain label {label[:63]!r}")
        elif not all(c.isalnum() or c == "-" for c in label) or len(label) > 63:
            raise _bad(what, "invalid internationalized domain label")


def domain_of(address: str) -> str:
    """The domain of a validated address, lower case."""
    return address.rpartition("@")[2].lower()


def in_domains(domain: str, domains: Iterable[str]) -> bool:
    """``domain`` equals one of ``domains`` (case-insensitive; ``.example.com`` = subdomains)."""
    d = domain.lower().rstrip(".")
    for entry in domains:
        e = entry.lower().rstrip(".")
        if d == e or (e.startswith(".") and d.endswith(e)):
            return True
    return False


def relay_refusal(*, auth_required: bool) -> Refusal:
    """The reply for a client that may not relay: 530 when AUTH would help, else 550."""
    if auth_required:
        return Refusal.from_reply(AUTH_REQUIRED, "auth_required")
    return Refusal.from_reply(RELAY_DENIED, "relay_denied")
