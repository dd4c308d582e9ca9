"""Serves /metrics, /healthz and /readyz over minimal HTTP/1.1 on relay's own event loop.

Prometheus' threaded ``start_http_server`` is not used: this server runs on the same loop
as everything else, so ``/healthz`` answering proves the loop is alive and not blocked.
One request per connection (``Connection: close``); GET and HEAD only. ``/metrics``
negotiates the exposition format like prometheus-client's own server (the Prometheus
text format 0.0.4 by default, OpenMetrics when the scraper asks for it), gzip when the
client accepts it, ``?name[]=`` to restrict the output to some metric families, and no
``*_created`` samples (older Prometheus servers store each as a useless extra series).

Request parsing and response rendering are sans-IO functions, table-tested on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import gzip
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from relay.acceptloop import AcceptLoop, bind_tcp
from relay.config.schema import HostPort
from relay.errors import RelayError
from relay.metrics import Metrics

log = logging.getLogger("relay.metrics")

MAX_HEAD = 8192                 # request line + headers
READ_TIMEOUT = 10.0             # for the whole request head
WRITE_TIMEOUT = 30.0

# A probe returns None when all is well, else a short reason ("draining").
Probe = Callable[[], str | None]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_INDEX = (b"relay metrics endpoint\n\n/metrics  Prometheus metrics\n"
          b"/healthz  liveness (the event loop answers)\n"
          b"/readyz   readiness (listeners bound, spool recovered, not draining)\n")


class _WithoutCreated:
    """A view of a registry without the ``*_created`` samples of counters and histograms.

    Prometheus before 2.50 stores each of them as a separate series (in either format),
    doubling relay's series count for a value no rule or dashboard uses.
    """

    _TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})

    def __init__(self, source: Collector) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            if family.type in self._TYPES:
                family = copy.copy(family)
                family.samples = [s for s in family.samples
                                  if not s.name.endswith(("_created", "_gcreated"))]
            yield family


class BadRequest(ValueError):
    """A request this server cannot parse; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    version: str
    headers: dict[str, str] = field(default_factory=dict)   # lower-case names


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


def parse_request(head: bytes) -> Request:
    """Parse a request head (request line and headers, ending with an empty line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest("undecodable request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not set(method) <= _TOKEN:
        raise BadRequest("malformed method")
    if not re.fullmatch(r"HTTP/\d\.\d", version):
        raise BadRequest("malformed HTTP version")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest("unsupported HTTP version", 505)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise BadRequest("obsolete header line folding")
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN:
            raise BadRequest("malformed header line")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if target != "*" and not target.startswith("/"):
        split = urlsplit(target)                     # absolute-form (proxies)
        if not split.scheme or not split.netloc:
            raise BadRequest("malformed request target")
        path, query = split.path or "/", split.query
    else:
        path, _, query = target.partition("?")
    return Request(method=method, path=path, query=parse_qs(query), version=version,
                   headers=headers)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding value allows gzip (honouring ``q=0`` refusals)."""
    allowed: bool | None = None
    star: bool | None = None
    for item in accept_encoding.split(","):
        coding, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if coding.lower() in ("gzip", "x-gzip"):
            allowed = q > 0
        elif coding == "*":
            star = q > 0
    return allowed if allowed is not None else bool(star)


def render_response(resp: Response, *, head_only: bool = False) -> bytes:
    """The bytes of an HTTP/1.1 response that closes the connection after it."""
    lines = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}"]
    lines += [f"{k}: {v}" for k, v in resp.headers]
    lines += [f"Content-Length: {len(resp.body)}", "Connection: close", "", ""]
    out = "\r\n".join(lines).encode("latin-1")
    return out if head_only else out + resp.body


def _text(status: int, body: str, *extra: tuple[str, str]) -> Response:
    return Response(status, body.encode(), (("Content-Type", "text/plain; charset=utf-8"),
                                            ("Cache-Control", "no-store"), *extra))


class MetricsServer:
    """The HTTP endpoint: metrics from ``metrics``, probes from the app's callables.

    ``readiness`` returns None when relay is ready (listeners bound, spool recovered) and
    a reason while it is not (starting, draining); ``health`` likewise for liveness
    beyond "the loop answers" (default: always healthy). ``before_scrape`` runs on the
    loop before each /metrics render, to refresh gauges computed at scrape time (queue
    age); an exception in it is logged and the scrape still served. ``refresh`` is its
    async twin, awaited before /metrics is rendered (it must bound its own wait: fetching
    listener processes' samples), and ``view`` wraps the collector being rendered (the
    sum over listener processes).
    """

    def __init__(self, *, metrics: Metrics, listen: HostPort, readiness: Probe | None = None,
                 health: Probe | None = None,
                 before_scrape: Callable[[], object] | None = None,
                 refresh: Callable[[], Awaitable[object]] | None = None,
                 view: Callable[[Any], Any] | None = None,
                 read_timeout: float = READ_TIMEOUT) -> None:
        self._metrics = metrics
        self._read_timeout = read_timeout
        self._listen = listen
        self._readiness = readiness
        self._health = health
        self._before_scrape = before_scrape
        self._refresh = refresh
        self._view = view
        self._server: AcceptLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def listen(self) -> HostPort:
        return self._listen

    @property
    def addresses(self) -> list[HostPort]:
        """The bound addresses (useful with port 0)."""
        if self._server is None:
            return []
        return [HostPort(s.getsockname()[0], s.getsockname()[1]) for s in self._server.sockets]

    async def start(self) -> None:
        """Bind and start serving; RelayError with a hint if the address cannot be bound."""
        try:
            socks = bind_tcp(self._listen.host, self._listen.port, backlog=100)
        except OSError as exc:
            hint = "set [metrics] listen to a free address, or stop the other process"
            if exc.errno == errno.EADDRINUSE:
                hint = ("another process (perhaps a second relay) already listens there; "
                        + hint)
            elif exc.errno in (errno.EACCES, errno.EPERM):
                hint = "ports below 1024 need CAP_NET_BIND_SERVICE; use a port such as 9325"
            elif exc.errno == errno.EADDRNOTAVAIL:
                hint = "that address is not configured on this host; check [metrics] listen"
            raise RelayError(f"metrics endpoint cannot listen on {self._listen}: "
                             f"{exc.strerror or exc}", hint=hint) from None

        def protocol() -> asyncio.StreamReaderProtocol:
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=MAX_HEAD),
                                                self._on_connection)
        self._server = AcceptLoop("metrics", socks, protocol, metrics=self._metrics)
        self._server.start()
        log.info("metrics endpoint listening on %s",
                 ", ".join(str(a) for a in self.addresses))

    async def stop(self) -> None:
        """Stop accepting and abort requests still in progress (they are instant)."""
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("metrics endpoint: unexpected error serving a request")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve_one(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout)
            request = parse_request(head)
            head_only = request.method == "HEAD"
            if request.path == "/metrics" and self._refresh is not None:
                try:
                    await self._refresh()
                except Exception:
                    log.exception("metrics endpoint: refreshing before a scrape failed")
            response = self.respond(request)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return                                   # connected and left: a port check
            response = _text(400, "incomplete request\n")
        except asyncio.LimitOverrunError:
            response = _text(431, "request head too large\n")
        except TimeoutError:
            response = _text(408, "request head not received in time\n")
        except BadRequest as exc:
            response = _text(exc.status, f"{exc}\n")
        writer.write(render_response(response, head_only=head_only))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)

    def respond(self, request: Request) -> Response:
        """The response to one parsed request (no I/O)."""
        routes: dict[str, Callable[[Request], Response]] = {
            "/metrics": self._scrape, "/healthz": self._healthz, "/readyz": self._readyz,
            "/": self._index}
        handler = routes.get(request.path)
        if handler is None:
            return _text(404, "not found: try /metrics, /healthz or /readyz\n")
        if request.method not in ("GET", "HEAD"):
            return _text(405, f"method {request.method} not allowed\n", ("Allow", "GET, HEAD"))
        return handler(request)

    def _index(self, _request: Request) -> Response:
        return Response(200, _INDEX, (("Content-Type", "text/plain; charset=utf-8"),))

    def _probe(self, probe: Probe | None, ok: str, name: str) -> Response:
        try:
            reason = probe() if probe is not None else None
        except Exception as exc:
            log.exception("%s probe raised", name)
            reason = f"{name} probe failed: {exc}"
        if reason is None:
            return _text(200, f"{ok}\n")
        return _text(503, f"not {ok}: {reason}\n")

    def _healthz(self, _request: Request) -> Response:
        return self._probe(self._health, "ok", "health")

    def _readyz(self, _request: Request) -> Response:
        return self._probe(self._readiness, "ready", "readiness")

    def _scrape(self, request: Request) -> Response:
        if self._before_scrape is not None:
            try:
                self._before_scrape()
            except Exception:
                log.exception("metrics endpoint: refreshing gauges before a scrape failed")
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        registry = self._metrics.registry
        names = request.query.get("name[]")
        try:
            source: Any = registry.restricted_registry(names) if names else registry
            if self._view is not None:
                source = self._view(source)
            body = encoder(_WithoutCreated(source))
        except Exception:
            log.exception("metrics endpoint: collecting metrics failed")
            return _text(500, "collecting metrics failed; see relay's log\n")
        headers = [("Content-Type", content_type), ("Cache-Control", "no-store"),
                   ("Vary", "Accept, Accept-Encoding")]
        if accepts_gzip(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=5)
            headers.append(("Content-Encoding", "gzip"))
        return Response(200, body, tuple(headers))
