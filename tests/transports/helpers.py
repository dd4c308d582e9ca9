"""Loopback helpers for transport tests: echo server, STARTTLS SMTP server, a blackhole."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import trustme
from aiosmtpd.controller import Controller

from relay.config.schema import ProxyConfig, Secret, UpstreamConfig
from tests.peers import free_port
from tests.peers.dante import Dante

TLS_NAME = "smtp.test.example"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1; yields its port."""
    srv = _Server(("127.0.0.1", 0), _Echo)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()


class Recorder:
    """aiosmtpd handler that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),  # type: ignore[attr-defined]
                              envelope.content))  # type: ignore[attr-defined]
        return "250 2.0.0 Ok: stored"


@contextlib.contextmanager
def smtp_server(ca: trustme.CA, *, names: tuple[str, ...] = (TLS_NAME,),
                implicit: bool = False,
                auth: dict[str, str] | None = None) -> Iterator[tuple[int, Recorder]]:
    """aiosmtpd on 127.0.0.1 with STARTTLS (or implicit TLS) using a cert for ``names``."""
    cert = ca.issue_cert(*names)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    handler = Recorder()
    port = free_port()
    kwargs: dict[str, object] = {}
    if implicit:
        kwargs["ssl_context"] = ctx
    else:
        kwargs["tls_context"] = ctx
        kwargs["require_starttls"] = False
    if auth is not None:
        creds = dict(auth)

        def authenticator(server: object, session: object, envelope: object, mechanism: str,
                          data: object) -> object:
            from aiosmtpd.smtp import AuthResult, LoginPassword
            if isinstance(data, LoginPassword):
                ok = creds.get(data.login.decode()) == data.password.decode()
                return AuthResult(success=ok)
            return AuthResult(success=False)

        kwargs["authenticator"] = authenticator
        kwargs["auth_require_tls"] = False
    ctl = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10,
                     server_hostname=TLS_NAME, **kwargs)
    ctl.start()
    try:
        yield port, handler
    finally:
        ctl.stop()


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A loopback port whose SYNs are dropped: a listener with a full accept queue.

    With backlog 0 Linux queues one connection; further SYNs are silently dropped, so a
    connect there times out exactly like a firewalled proxy would.
    """
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = int(srv.getsockname()[1])
    filler = socket.create_connection(("127.0.0.1", port), timeout=2)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(("127.0.0.1", port))
        raise RuntimeError("blackhole did not hold: the accept queue is not full")
    except TimeoutError:
        pass
    finally:
        probe.close()
    try:
        yield port
    finally:
        filler.close()
        srv.close()


def proxy_config(d: Dante, *, name: str = "dante", password: str | None = None,
                 username: str | None = None, port: int | None = None,
                 connect_timeout: float = 15.0) -> ProxyConfig:
    return ProxyConfig(name=name, kind="socks5", host=d.host, port=port or d.port,
                       username=d.user if username is None else username,
                       password=Secret(d.password if password is None else password,
                                       "env DANTE_PASSWORD"),
                       connect_timeout=connect_timeout)


def upstream_config(port: int, ca_file: Path, *, name: str = "provider",
                    host: str = "127.0.0.1", via: str | None = "dante",
                    tls: str = "starttls", server_name: str | None = TLS_NAME) -> UpstreamConfig:
    return UpstreamConfig(name=name, protocol="smtp", host=host, port=port,
                          tls=tls,  # type: ignore[arg-type]
                          ca_file=ca_file, tls_server_name=server_name, via=via,
                          connect_timeout=10.0)
