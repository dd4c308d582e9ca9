"""SMTP AUTH PLAIN and LOGIN (RFC 4954, 4616): the exchange, the check, the throttle.

A wrong password gets ``535 5.7.8`` at once (the first time) and after a growing delay
on repeats from the same address; at the listener's ``auth_fail_limit`` the session is
closed with ``421 4.7.0`` and the address is refused AUTH (``454 4.7.0``) for
``auth_fail_window`` seconds. Failures are also counted per account, from every address
and listener (``relay.throttle``): at ``account_fail_limit`` the account is refused
(``454 4.7.0``, its password not even checked) for ``account_fail_window``.
Credentials and AUTH payloads are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import TYPE_CHECKING

from relay import sasl
from relay.smtp import replies
from relay.smtp.protocol import LineTooLong
from relay.verdict import Refusal

if TYPE_CHECKING:
    from relay.smtp.server import RelaySMTP

log = logging.getLogger("relay.smtp")

MAX_RESPONSE = 12288


class _Abort(Exception):
    """The exchange ended with this reply (already decided, not a credential failure)."""


def _b64(text: bytes) -> bytes:
    try:
        return sasl.b64decode(text)
    except sasl.SaslError:
        raise _Abort("501 5.5.2 Cannot decode base64 response") from None


async def _response(session: RelaySMTP, challenge: bytes) -> bytes:
    session.screening = False                   # a SASL response is not a command line
    await session.send_lines([f"334 {base64.b64encode(challenge).decode()}"])
    try:
        line = await session.read_line(MAX_RESPONSE)
    except LineTooLong:
        raise _Abort("500 5.5.6 Authentication response too long") from None
    finally:
        session.screening = True
    if line is None:                            # the client went away
        session.close()
        raise _Abort("")
    if line == b"*":
        raise _Abort("501 5.7.0 Authentication aborted")
    return _b64(line)


async def _credentials(session: RelaySMTP, mechanism: str,
                       initial: str | None) -> tuple[str, bytes] | None:
    """Run the exchange; None when the response could not be decoded as credentials."""
    try:
        if mechanism == "PLAIN":
            data = _b64(initial.encode()) if initial is not None else \
                await _response(session, b"")
            user, password = sasl.parse_plain(data)
        else:
            user_b = _b64(initial.encode()) if initial is not None else \
                await _response(session, b"Username:")
            password_b = await _response(session, b"Password:")
            user, password = sasl.decode_text(user_b), sasl.decode_text(password_b)
    except sasl.SaslError:
        return None
    return user, password.encode("utf-8")


async def run_auth(session: RelaySMTP, arg: str | None) -> None:
    """Handle one AUTH command on ``session``."""
    ctx = session.ctx
    ip = session._client_ip
    if not session.state.host_name or not session.state.extended_smtp:
        await session.push("503 5.5.1 Error: send EHLO first")
        return
    if ctx.users is None:
        await session.push("502 5.5.1 Error: authentication not enabled")
        return
    if not session.tls and not ctx.cfg.allow_plaintext_auth:
        await session.push(replies.AUTH_ENCRYPTION)
        return
    if session._auth_user:
        await session.push("503 5.5.1 Error: already authenticated")
        return
    if session._txn is not None:
        await session.push("503 5.5.1 Error: AUTH not permitted during a mail transaction")
        return
    parts = (arg or "").split()
    if not 1 <= len(parts) <= 2:
        await session.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        return
    mechanism = parts[0].upper()
    if mechanism not in ("PLAIN", "LOGIN"):
        await session.push("504 5.5.4 Unrecognized authentication type")
        return
    if ctx.throttle.blocked(ip):
        ctx.refused(Refusal.from_reply(replies.AUTH_BLOCKED, "auth_blocked"),
                    info=session.info(), client=ip, stage="AUTH")
        await session.push(replies.AUTH_BLOCKED)
        return
    try:
        creds = await _credentials(session, mechanism, parts[1] if len(parts) == 2 else None)
    except _Abort as abort:
        if str(abort):
            await session.push(str(abort))
        return
    ok = False
    user = ""
    if creds is not None:
        user, password = creds
        if ctx.throttle.refusal(ip, user) == "account":     # its password is not checked
            ctx.refused(Refusal.from_reply(replies.AUTH_BLOCKED, "auth_blocked"),
                        info=session.info(), client=ip, stage="AUTH")
            await session.push(replies.AUTH_BLOCKED)
            return
        ok = await asyncio.to_thread(ctx.users.verify_sync, user, password)
    if ok:
        ctx.throttle.success(ip, user)
        session._auth_user = user
        log.info("%s: %s authenticated as %r (%s)", ctx.cfg.name, ip, user, mechanism)
        await session.push(replies.AUTH_OK)
        return
    if ctx.metrics is not None:
        ctx.metrics.auth_failures.labels(ctx.cfg.name, "smtp").inc()
    delay, blocked = ctx.throttle.failure(ip, user or None, listener=ctx.cfg.name,
                                          protocol="smtp")
    ctx.maillog.rejected(client=f"{ip}[{ctx.cfg.name}]", stage="AUTH", reason="auth_failed",
                         mechanism=mechanism, user=user or None)
    if delay:
        await asyncio.sleep(delay)              # the throttle itself, not a wait for state
    if blocked and ctx.throttle.refusal(ip) == "network":   # this client: goodbye
        await session.push(replies.AUTH_CLOSING)
        session.close()
        return
    await session.push(replies.AUTH_INVALID)
