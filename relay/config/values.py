"""Parse config value notations: sizes, durations, host:port, IP networks, names.

Each parser takes the raw TOML value and returns the typed value or raises
``BadValue(what, expected, hint)``; the loader adds file, line and key path.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from relay.config.schema import HostPort, Network


class BadValue(ValueError):
    """A value that does not parse; ``expected`` and ``hint`` are for the operator."""

    def __init__(self, what: str, *, expected: str, hint: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.expected = expected
        self.hint = hint


# Binary units, as mail providers quote limits ("35 MB" in Exchange Online is 35 MiB).
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024,
               "M": 1024**2, "MB": 1024**2, "MIB": 1024**2,
               "G": 1024**3, "GB": 1024**3, "GIB": 1024**3}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
SIZE_EXPECTED = 'a size such as "35MB", "512KB" or a number of bytes'
MAX_SIZE = float(2**60)                          # 1 EB: past any real limit, inside int64
MAX_DURATION = 100 * 365 * 86400.0               # 100 years: no timeout is longer

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
DURATION_EXPECTED = 'a duration such as "30s", "5m", "2h", "5d" (or "1h30m") or seconds'

_COMMA_IPV4 = re.compile(r"^\d{1,3}(?:[.,]\d{1,3}){3}(?:/\d{1,2})?$")
# The validators below end with \Z, never $: $ also matches before a trailing newline, so
# "relay.example.com\n" would pass. These values are written into the headers of mail
# relay queues (the hostname in Received:, header-rule names, DKIM d= and s=), where a
# newline would be a bare LF, which relay must never send (SMTP smuggling).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_HOST_RE = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})"
                      r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?\Z")
_HEADER_RE = re.compile(r"^[!-9;-~]+\Z")     # RFC 5322 ftext: printable ASCII minus ":"


def parse_size(value: object) -> int:
    """``"35MB"`` → 36700160; a bare integer is bytes. Units are binary (1 KB = 1024)."""
    if isinstance(value, bool):
        raise BadValue("not a size", expected=SIZE_EXPECTED)
    if isinstance(value, int):
        if value < 0:
            raise BadValue("negative size", expected=SIZE_EXPECTED)
        if value > MAX_SIZE:
            raise BadValue("size too large", expected=f"{SIZE_EXPECTED}, at most 1 EB")
        return value
    if not isinstance(value, str):
        raise BadValue("not a size", expected=SIZE_EXPECTED)
    m = _SIZE_RE.fullmatch(value)
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise BadValue("not a size", expected=SIZE_EXPECTED,
                       hint="units are B, KB, MB, GB (binary: 1 MB = 1048576 bytes)")
    size = float(m.group(1)) * _SIZE_UNITS[unit]
    if not size <= MAX_SIZE:                      # also catches an infinite float
        raise BadValue("size too large", expected=f"{SIZE_EXPECTED}, at most 1 EB")
    return int(size)


def parse_duration(value: object) -> float:
    """``"5m"`` → 300.0; ``"1h30m"`` → 5400.0; a bare number is seconds."""
    if isinstance(value, bool):
        raise BadValue("not a duration", expected=DURATION_EXPECTED)
    if isinstance(value, int | float):
        if value < 0:
            raise BadValue("negative duration", expected=DURATION_EXPECTED)
        if not value <= MAX_DURATION:             # also NaN and infinity
            raise BadValue("duration too long", expected=f"{DURATION_EXPECTED}, at most "
                           "100 years")
        return float(value)
    if not isinstance(value, str):
        raise BadValue("not a duration", expected=DURATION_EXPECTED)
    text = value.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise BadValue("not a duration", expected=DURATION_EXPECTED,
                       hint="units are ms, s, m, h, d")
    if not total <= MAX_DURATION:
        raise BadValue("duration too long", expected=f"{DURATION_EXPECTED}, at most 100 years")
    return total


def comma_typo(text: str) -> str | None:
    """The dotted form of ``69,169,235,170`` (a typo seen in vendor documents), else None."""
    t = text.strip()
    if "," in t and _COMMA_IPV4.match(t):
        return t.replace(",", ".")
    return None


def _comma_error(text: str, fixed: str) -> AddressTypo:
    return AddressTypo("IPv4 address written with commas", (fixed,),
                       hint=f'write "{fixed}": IPv4 addresses are separated by dots '
                            "(vendor pages sometimes print commas)")


# What an input method types for "," and "." in Japanese or Chinese text: NFKC maps the
# full-width forms (and digits) to ASCII, not the ideographic comma and full stop.
_WIDE_PUNCT = str.maketrans({"\u3001": ",", "\u3002": ".", "\ufe50": ",", "\ufe52": "."})
_LIST_SPLIT = re.compile(r"[\s,;]+")


class AddressTypo(BadValue):
    """A recognisable typo in an address; ``fixed`` is what was meant (one or more)."""

    def __init__(self, what: str, fixed: tuple[str, ...], *, hint: str) -> None:
        expected = (f'"{fixed[0]}"' if len(fixed) == 1 else
                    "[" + ", ".join(f'"{f}"' for f in fixed) + "]")
        super().__init__(what, expected=expected, hint=hint)
        self.fixed = fixed


def _is_ip_or_net(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def address_typo(value: str) -> AddressTypo | None:
    """The error, with the fix, for an address typed the ways vendor pages and input
    methods lead people to: commas for dots (``69,169,235,170``), full-width digits, commas
    and full stops (U+FF10-FF19, U+FF0C, U+3001, U+FF0E), two addresses in one string
    (``"69.169.235.170, 69.169.235.171"``). None when it is none of those."""
    text = value.strip()
    narrow = unicodedata.normalize("NFKC", text).translate(_WIDE_PUNCT)
    if narrow != text and narrow.isascii():
        meant = comma_typo(narrow) or narrow
        if _is_ip_or_net(meant):
            return AddressTypo("address written with full-width characters", (meant,),
                               hint=f'write "{meant}" in plain ASCII: "\uff0c" "\u3001" "\uff0e" '
                                    "and full-width digits are what a Japanese input "
                                    "method types")
    fixed = comma_typo(text)
    if fixed is not None:
        return _comma_error(text, fixed)
    parts = tuple(p for p in _LIST_SPLIT.split(narrow if narrow.isascii() else text) if p)
    if len(parts) > 1 and all(_is_ip_or_net(p) for p in parts):
        items = ", ".join(f'"{p}"' for p in parts)
        return AddressTypo(f"{len(parts)} addresses in one string", parts,
                           hint=f"give each address its own quoted item: {items}")
    return None


def parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address, refusing the comma-written IPv4 typo with a suggestion."""
    typo = address_typo(value)
    if typo is not None:
        raise typo
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise BadValue("not an IP address",
                       expected='an IPv4 or IPv6 address such as "192.0.2.1"') from None


def parse_network(value: str) -> Network:
    """``"10.20.0.0/16"``, ``"192.0.2.7"`` (→ /32) or ``"::1"``; host bits must be zero."""
    typo = address_typo(value)
    if typo is not None:
        raise typo
    text = value.strip()
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise BadValue("not an IP network", expected='a CIDR such as "10.20.0.0/16" or an '
                       'address such as "192.0.2.7"') from None
    raise BadValue("network has host bits set", expected=f'"{loose}"',
                   hint=f'"{text}" is inside "{loose}"; write the network address')


def looks_like_network(value: str) -> bool:
    """True if ``value`` is meant as an address (digits, dots, colons, slash), not a name."""
    return bool(re.fullmatch(r"[0-9a-fA-F.:,/\[\]]+", value.strip())) and not value.isalpha()


def parse_hostport(value: object, *, default_port: int | None = None,
                   ip_only: bool = False) -> HostPort:
    """``"0.0.0.0:587"``, ``"[::1]:2525"``, ``"mx.example.com:25"``, or a host alone when
    ``default_port`` is given."""
    expected = '"HOST:PORT" such as "127.0.0.1:2525" or "[::1]:2525"'
    if not isinstance(value, str) or not value.strip():
        raise BadValue("not an address", expected=expected)
    text = value.strip()
    fixed = comma_typo(text.rsplit(":", 1)[0] if text.count(":") == 1 else text)
    if fixed is not None:
        port_part = text[len(text.rsplit(":", 1)[0]):] if text.count(":") == 1 else ""
        raise _comma_error(text, fixed + port_part)
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadValue("unclosed [ in IPv6 address", expected=expected)
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise BadValue("junk after ]", expected=expected)
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise BadValue("IPv6 address without brackets", expected=expected,
                       hint=f'write "[{text}]:PORT"')
    if not port_text:
        if default_port is None:
            raise BadValue("missing port", expected=expected)
        port = default_port
    else:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise BadValue("port out of range", expected="a port from 1 to 65535")
        port = int(port_text)
    parse_host(host, ip_only=ip_only)
    return HostPort(host, port)


def parse_host(host: str, *, ip_only: bool = False) -> str:
    """A host name or IP address (no port)."""
    fixed = comma_typo(host)
    if fixed is not None:
        raise _comma_error(host, fixed)
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        if ip_only:
            raise BadValue("not an IP address",
                           expected='an IP address such as "192.0.2.53"') from None
    if not _HOST_RE.match(host) or host.replace(".", "").isdigit():
        raise BadValue("not a host name or IP address",
                       expected='a host such as "smtp.office365.com" or "192.0.2.10"')
    return host


def is_name(value: str) -> bool:
    """Names of listeners, upstreams, proxies, profiles, sets: letters, digits, ``_.-``."""
    return bool(_NAME_RE.match(value))


_SELECTOR_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*\Z")


def is_selector(value: str) -> bool:
    """A DKIM selector: DNS labels (letters, digits, "-", "_"), dot-separated."""
    return bool(_SELECTOR_RE.match(value))


def is_header_name(value: str) -> bool:
    return bool(_HEADER_RE.match(value))


def is_domain(value: str) -> bool:
    return (bool(_HOST_RE.match(value)) and "." in value.strip(".")) or value == "localhost"


def is_address(value: str) -> bool:
    """A plain ``local@domain`` mail address (no display name, no brackets)."""
    local, sep, domain = value.rpartition("@")
    return bool(sep and local and is_domain(domain)) and not any(c in value for c in " <>\r\n")


OWNED_EXPECTED = ('an address such as "sales@example.com", a domain such as "example.com" '
                  'or "*.example.com" for its subdomains')


def is_owned(value: str) -> bool:
    """What a user may own for sender ownership: an address, a domain or ``*.domain``."""
    return is_address(value) or is_domain(value.removeprefix("*."))


def is_loopback_host(host: str) -> bool:
    """A loopback address (127.0.0.0/8, ::1) or the name localhost."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
