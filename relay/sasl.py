"""The one SASL codec: PLAIN and LOGIN read from clients, PLAIN and XOAUTH2 written upstream.

Used by the SMTP listener's AUTH, the IMAP/POP3 proxy and the upstream SMTP session.
Strict: canonical base64, UTF-8 credentials without NUL, CR or LF.
"""

from __future__ import annotations

import base64
import binascii
import re

# AUTHENTICATE LOGIN prompts ("Username:", "Password:"), as every server sends them.
LOGIN_USER_PROMPT = base64.b64encode(b"Username:")
LOGIN_PASS_PROMPT = base64.b64encode(b"Password:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_clean(value: str) -> bool:
    """True when a user name or password has no NUL, CR or LF (no command injection)."""
    return not any(c in value for c in "\x00\r\n")


def is_clean_name(value: str) -> bool:
    """True when a user name has no control character at all (C0, DEL, C1): nothing a
    provider, a log or a terminal could read as anything but a name."""
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value)


class SaslError(ValueError):
    """A malformed SASL response from the client (bad base64, wrong shape, control chars)."""


def b64decode(data: bytes) -> bytes:
    """Strict base64 (``=`` alone means an empty response, as SASL-IR says)."""
    data = data.strip()
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SaslError("invalid base64") from exc


def decode_text(raw: bytes) -> str:
    """UTF-8 text of a credential, refusing NUL/CR/LF."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaslError("credentials are not UTF-8") from exc
    if not is_clean(text):
        raise SaslError("control characters in credentials")
    return text


def parse_plain(payload: bytes) -> tuple[str, str]:
    """RFC 4616 PLAIN: ``authzid NUL authcid NUL passwd`` → (user, password).

    An authorization identity other than the user itself is refused: relay does not
    let one account act as another.
    """
    parts = payload.split(b"\x00")
    if len(parts) != 3:
        raise SaslError("PLAIN response must have three NUL-separated fields")
    authzid, authcid, passwd = (p.decode("utf-8", "replace") for p in parts)
    user = decode_text(parts[1])
    password = decode_text(parts[2])
    if not authcid or not passwd:
        raise SaslError("empty user or password")
    if authzid and authzid != authcid:
        raise SaslError("authorization identity differs from the user")
    return user, password


def plain_string(user: str, password: str) -> bytes:
    """Base64 PLAIN initial response for an upstream login."""
    if not (is_clean(user) and is_clean(password)):
        raise SaslError("control characters in credentials")
    return base64.b64encode(b"\x00" + user.encode() + b"\x00" + password.encode())


def xoauth2_string(user: str, token: str) -> bytes:
    """Base64 XOAUTH2 initial response: ``user=U ^A auth=Bearer T ^A ^A`` (Google, Microsoft).

    The user name and token must be non-empty and free of control characters (the token
    also of spaces), or the framing would break.
    """
    if not user or _CONTROL.search(user):
        raise SaslError("XOAUTH2 user name is empty or contains control characters")
    if not token or _CONTROL.search(token) or " " in token:
        raise SaslError("XOAUTH2 token is empty or contains control characters or spaces")
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw)
