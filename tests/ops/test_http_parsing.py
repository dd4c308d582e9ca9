"""Table tests of the metrics endpoint's sans-IO request parsing and response rendering."""

from __future__ import annotations

import pytest

from relay.ops.endpoint import BadRequest, Response, accepts_gzip, parse_request, render_response

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(("head", "method", "path", "query", "headers"), [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/metrics", {}, {"host": "x"}),
    (b"HEAD /healthz HTTP/1.0\r\n\r\n", "HEAD", "/healthz", {}, {}),
    (b"GET /metrics?name[]=relay_build_info&name[]=relay_queue_messages HTTP/1.1\r\n\r\n",
     "GET", "/metrics", {"name[]": ["relay_build_info", "relay_queue_messages"]}, {}),
    (b"GET http://10.0.0.1:9325/readyz?x=1 HTTP/1.1\r\n\r\n", "GET", "/readyz", {"x": ["1"]},
     {}),
    (b"GET / HTTP/1.1\r\nAccept-Encoding: gzip\r\naccept-encoding: br\r\n\r\n", "GET", "/",
     {}, {"accept-encoding": "gzip, br"}),
    (b"GET / HTTP/1.1\r\nX-Empty:\r\nUser-Agent:  Prometheus/2.42 \r\n\r\n", "GET", "/", {},
     {"x-empty": "", "user-agent": "Prometheus/2.42"}),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "POST", "/metrics", {},
     {"content-length": "0"}),
])
def test_parse_request(head: bytes, method: str, path: str, query: dict[str, list[str]],
                       headers: dict[str, str]) -> None:
    req = parse_request(head)
    assert (req.method, req.path, req.query, req.headers) == (method, path, query, headers)


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /metrics\r\n\r\n", 400),                              # HTTP/0.9 style
    (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),                    # double space
    (b"\r\n\r\n", 400),
    (b"G(T /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"GET /metrics HTTX/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nA: b\r\n  folded\r\n\r\n", 400),
    (b"GET metrics HTTP/1.1\r\n\r\n", 400),                      # neither origin nor absolute
])
def test_parse_request_refuses(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(head)
    assert info.value.status == status


@pytest.mark.parametrize(("value", "expected"), [
    ("", False),
    ("gzip", True),
    ("GZIP", True),
    ("deflate, gzip;q=0.5", True),
    ("gzip;q=0", False),
    ("gzip; q=0.0, *", False),
    ("*", True),
    ("*;q=0", False),
    ("br, deflate", False),
    ("x-gzip", True),
    ("gzip;q=nonsense", False),
])
def test_accepts_gzip(value: str, expected: bool) -> None:
    assert accepts_gzip(value) is expected


def test_render_response() -> None:
    resp = Response(503, b"not ready: draining\n", (("Content-Type", "text/plain"),))
    assert render_response(resp) == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 20\r\nConnection: close\r\n\r\nnot ready: draining\n")
    head_only = render_response(resp, head_only=True)
    assert head_only.endswith(b"Content-Length: 20\r\nConnection: close\r\n\r\n")
