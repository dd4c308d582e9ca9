"""An aiosmtpd upstream for ``relay check`` tests: STARTTLS, PLAIN/LOGIN and XOAUTH2 AUTH."""

from __future__ import annotations

import base64
import contextlib
import ssl
from collections.abc import Container, Iterator

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from tests.peers import free_port
from tests.transports.helpers import TLS_NAME, Recorder


class AuthHandler(Recorder):
    """Accepts one user/password, XOAUTH2 bearer tokens from ``tokens``, or refuses with
    ``refuse`` (a full reply such as ``535 5.7.139 ...``)."""

    def __init__(self, users: dict[str, str], tokens: Container[str],
                 refuse: str | None) -> None:
        super().__init__()
        self.users, self.tokens, self.refuse = users, tokens, refuse
        self.xoauth2: list[str] = []

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        raw = base64.b64decode(args[1]).decode()
        fields = dict(p.split("=", 1) for p in raw.split("\x01") if p)
        self.xoauth2.append(fields["user"])
        token = fields["auth"].removeprefix("Bearer ")
        if self.refuse is None and token in self.tokens:
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False,
                          message=self.refuse or "535 5.7.3 Authentication unsuccessful")

    def authenticator(self, server: object, session: object, envelope: object,
                      mechanism: str, data: object) -> AuthResult:
        if self.refuse is None and isinstance(data, LoginPassword) and \
                self.users.get(data.login.decode()) == data.password.decode():
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False,
                          message=self.refuse or "535 5.7.8 Authentication credentials invalid")


@contextlib.contextmanager
def auth_smtp(ca: trustme.CA, *, names: tuple[str, ...] = (TLS_NAME,),
              users: dict[str, str] | None = None, tokens: Container[str] | None = None,
              refuse: str | None = None) -> Iterator[tuple[int, AuthHandler]]:
    cert = ca.issue_cert(*names)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    handler = AuthHandler(users or {}, tokens if tokens is not None else set(), refuse)
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10,
                     server_hostname=TLS_NAME, tls_context=ctx, require_starttls=True,
                     authenticator=handler.authenticator, auth_require_tls=True)
    ctl.start()
    try:
        yield port, handler
    finally:
        ctl.stop()
