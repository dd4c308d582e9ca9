"""The sans-IO HTTP/1.1 response parser and request builder, table-tested."""

from __future__ import annotations

import pytest

from relay.oauth.http import HttpProtocolError, ResponseParser, build_request

pytestmark = pytest.mark.fast

OK = [
    ("content-length",
     b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
     False, 200, b'{"a":1}'),
    ("chunked with extension and trailer",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nX-Trailer: t\r\n\r\n", False, 200, b'{"a":1}'),
    ("until close", b"HTTP/1.1 400 Bad Request\r\n\r\n{\"error\":\"x\"}", True, 400,
     b'{"error":"x"}'),
    ("100 continue first",
     b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False, 200,
     b"ok"),
    ("no content", b"HTTP/1.1 204 No Content\r\n\r\n", False, 204, b""),
    ("zero length", b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False, 200, b""),
    ("bare LF", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi", False, 200, b"hi"),
]


@pytest.mark.parametrize(("name", "raw", "needs_eof", "status", "body"), OK,
                         ids=[c[0] for c in OK])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_parses(name: str, raw: bytes, needs_eof: bool, status: int, body: bytes,
                step: int) -> None:
    p = ResponseParser()
    for i in range(0, len(raw), step):
        p.feed(raw[i:i + step])
    if needs_eof:
        assert not p.done
        p.feed_eof()
    assert p.response is not None
    assert (p.response.status, p.response.body) == (status, body)


def test_headers_are_lowercased() -> None:
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nX-Ms-Request-Id: abc\r\nContent-Length: 0\r\n\r\n")
    assert p.response is not None and p.response.headers["x-ms-request-id"] == "abc"
    assert p.response.reason == "OK"


BAD = [
    ("not http", b"SSH-2.0-OpenSSH_9.2\r\n\r\n", False),
    ("bad header", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", False),
    ("bad chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False),
    ("chunk without CRLF", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
     False),
    ("conflicting lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     False),
    ("bad length", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", False),
    ("gzip encoding", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", False),
    ("truncated body", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True),
    ("truncated head", b"HTTP/1.1 200 OK\r\nContent-Le", True),
    ("too large", b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", False),
    ("chunk too large", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffff\r\n",
     False),
]


@pytest.mark.parametrize(("name", "raw", "eof"), BAD, ids=[c[0] for c in BAD])
def test_rejects(name: str, raw: bytes, eof: bool) -> None:
    p = ResponseParser()
    with pytest.raises(HttpProtocolError):
        p.feed(raw)
        if eof:
            p.feed_eof()


def test_header_flood_is_bounded() -> None:
    p = ResponseParser()
    with pytest.raises(HttpProtocolError):
        p.feed(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70000)


def test_build_request() -> None:
    host, port, tls, req = build_request("https://login.example:8443/t/oauth2/v2.0/token?x=1",
                                    {"grant_type": "client_credentials", "scope": "a b"})
    assert (host, port, tls) == ("login.example", 8443, True)
    head, body = req.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /t/oauth2/v2.0/token?x=1 HTTP/1.1\r\nHost: login.example:8443")
    assert body == b"grant_type=client_credentials&scope=a+b"
    assert f"Content-Length: {len(body)}".encode() in head
    with pytest.raises(ValueError):
        build_request("http://insecure.example/token", {})
    assert build_request("http://127.0.0.1:8080/token", {})[:3] == ("127.0.0.1", 8080, False)
