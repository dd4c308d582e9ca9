"""Table tests for config value notations: sizes, durations, addresses, networks."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from relay.config.schema import HostPort
from relay.config.values import (
    BadValue,
    address_typo,
    comma_typo,
    is_domain,
    is_header_name,
    is_name,
    is_selector,
    parse_duration,
    parse_hostport,
    parse_network,
    parse_size,
)

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(("raw", "want"), [
    (0, 0), (1234, 1234), ("35MB", 35 * 1024 * 1024), ("35 MB", 35 * 1024 * 1024),
    ("512KB", 512 * 1024), ("512k", 512 * 1024), ("1GiB", 1024**3), ("10B", 10),
    ("3mb", 3 * 1024 * 1024), ("1.5MB", 1572864), ("100", 100),
])
def test_sizes(raw: object, want: int) -> None:
    assert parse_size(raw) == want


@pytest.mark.parametrize("raw", ["35 M B", "MB", "-1", -1, True, "35TB", "", 1.5, [1]])
def test_bad_sizes(raw: object) -> None:
    with pytest.raises(BadValue):
        parse_size(raw)


@pytest.mark.parametrize(("raw", "want"), [
    (30, 30.0), (1.5, 1.5), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0),
    ("1h30m", 5400.0), ("250ms", 0.25), ("0s", 0.0), (" 10S ", 10.0),
])
def test_durations(raw: object, want: float) -> None:
    assert parse_duration(raw) == want


@pytest.mark.parametrize("raw", ["5", "5 m", "m", "5w", "", "1h 30m", -3, False, "5m30"])
def test_bad_durations(raw: object) -> None:
    with pytest.raises(BadValue):
        parse_duration(raw)


@pytest.mark.parametrize(("raw", "default", "want"), [
    ("0.0.0.0:587", None, HostPort("0.0.0.0", 587)),
    ("[::1]:2525", None, HostPort("::1", 2525)),
    ("mx.example.com:25", None, HostPort("mx.example.com", 25)),
    ("127.0.0.1", 53, HostPort("127.0.0.1", 53)),
    ("[::1]", 53, HostPort("::1", 53)),
    ("localhost:65535", None, HostPort("localhost", 65535)),
])
def test_hostports(raw: str, default: int | None, want: HostPort) -> None:
    assert parse_hostport(raw, default_port=default) == want


@pytest.mark.parametrize(("raw", "what"), [
    ("127.0.0.1", "missing port"),
    ("127.0.0.1:0", "port out of range"),
    ("127.0.0.1:65536", "port out of range"),
    ("127.0.0.1:smtp", "port out of range"),
    ("::1:25", "IPv6 address without brackets"),
    ("[::1:25", "unclosed [ in IPv6 address"),
    ("69,169,235,170:25", "IPv4 address written with commas"),
    ("bad host:25", "not a host name or IP address"),
    ("999.1.1.1:25", "not a host name or IP address"),
])
def test_bad_hostports(raw: str, what: str) -> None:
    with pytest.raises(BadValue) as exc:
        parse_hostport(raw)
    assert exc.value.what == what


@pytest.mark.parametrize(("text", "fixed"), [
    ("69,169,235,170", ("69.169.235.170",)),
    ("69\uff0c169\uff0c235\uff0c170", ("69.169.235.170",)),          # full-width commas
    ("69\u3001169\u3001235\u3001170", ("69.169.235.170",)),          # ideographic commas
    ("69\uff0e169\uff0e235\uff0e170", ("69.169.235.170",)),          # full-width stops
    ("\uff16\uff19.169.235.170", ("69.169.235.170",)),                # full-width digits
    ("\uff11\uff10.0.0.0/\uff18", ("10.0.0.0/8",)),
    ("69.169.235.170, 69.169.235.171", ("69.169.235.170", "69.169.235.171")),
    ("69.169.235.170 69.169.235.171", ("69.169.235.170", "69.169.235.171")),
    ("10.0.0.0/8;192.0.2.7", ("10.0.0.0/8", "192.0.2.7")),
    ("69.169.235.170\uff0c69.169.235.171", ("69.169.235.170", "69.169.235.171")),
    ("69.169.235.170", None), ("cxone-na1", None), ("2001:db8::1", None), ("", None),
])
def test_address_typos(text: str, fixed: tuple[str, ...] | None) -> None:
    typo = address_typo(text)
    assert (typo.fixed if typo is not None else None) == fixed


def test_comma_typo_suggests_dots() -> None:
    assert comma_typo("69,169,235,170") == "69.169.235.170"
    assert comma_typo("69,169.235,170/32") == "69.169.235.170/32"
    assert comma_typo("69.169.235.170") is None
    assert comma_typo("cxone-na1") is None
    with pytest.raises(BadValue) as exc:
        parse_network("69,169,235,170")
    assert exc.value.expected == '"69.169.235.170"'
    with pytest.raises(BadValue) as exc:
        parse_hostport("69,169,235,170:25")
    assert exc.value.expected == '"69.169.235.170:25"'


@pytest.mark.parametrize(("raw", "want"), [
    ("10.20.0.0/16", "10.20.0.0/16"), ("192.0.2.7", "192.0.2.7/32"), ("::1", "::1/128"),
    ("2001:db8::/32", "2001:db8::/32"),
])
def test_networks(raw: str, want: str) -> None:
    assert parse_network(raw) == ipaddress.ip_network(want)


def test_network_with_host_bits_suggests_the_network() -> None:
    with pytest.raises(BadValue) as exc:
        parse_network("10.20.0.1/16")
    assert exc.value.expected == '"10.20.0.0/16"'


@pytest.mark.parametrize(("check", "good"), [
    (is_domain, "relay.example.com"), (is_header_name, "X-Relay"), (is_selector, "relay2025"),
    (is_name, "platform"),
])
def test_a_trailing_newline_is_refused(check: Callable[[str], bool], good: str) -> None:
    """These values go into message headers (Received:, header rules, DKIM-Signature), where
    a newline is a bare LF; a regex ending in $ would let one through before the end."""
    assert check(good)
    for bad in (good + "\n", good + "\r\n", good + "\r", "\n" + good):
        assert not check(bad), repr(bad)


def test_a_host_with_a_newline_is_refused() -> None:
    with pytest.raises(BadValue):
        parse_hostport("smtp.example.net\n:587")
    # blanks around the whole value are stripped: the host kept has no newline
    assert parse_hostport("smtp.example.net\n", default_port=587).host == "smtp.example.net"
