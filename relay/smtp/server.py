"""One SMTP session: relay's commands, limits, AUTH and DATA.

``protocol.SmtpProtocol`` provides the command loop, STARTTLS and the byte pump; this
module implements EHLO (PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES,
STARTTLS, AUTH), MAIL, RCPT (strict address policy and relay decision), AUTH (PLAIN,
LOGIN against the users file, off the loop, with throttling), DATA (the chunked sans-IO
reader of ``data.py``), timeouts (a ``421 4.4.2`` before closing) and adds enhanced
status codes to every reply.
Against hostile clients (``session_limits.py``): per-network admission (``connlimits``),
a cap on junk commands, non-SMTP input closed at once, a deadline for the whole DATA and
for the STARTTLS handshake, and junk that never extends the command deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from relay.connlimits import (
    METRIC_REASON,
    RESERVED,
    TOO_FAST,
    TOO_MANY,
    TOO_MANY_FROM_CLIENT,
    UNAVAILABLE,
    ConnectionCounter,
    Limits,
)
from relay.smtp import replies
from relay.smtp.auth import run_auth
from relay.smtp.defences import DefendedSession
from relay.smtp.handler import Context, Transaction, finish_message
from relay.smtp.policy import (
    domain_of,
    in_domains,
    local_part_refusal,
    mail_params,
    parse_command,
    relay_refusal,
)
from relay.smtp.replies import with_enhanced
from relay.verdict import Refusal, SessionInfo

log = logging.getLogger("relay.smtp")

_RAW = ("220 ", "220-", "334 ", "354 ")     # no enhanced code (greeting, challenges, 354)
_REFUSALS = {TOO_MANY: replies.TOO_MANY_CONNECTIONS,
             TOO_MANY_FROM_CLIENT: replies.TOO_MANY_FROM_CLIENT,
             RESERVED: replies.RESERVED_FOR_OTHERS, TOO_FAST: replies.TOO_FAST,
             UNAVAILABLE: replies.NOT_AVAILABLE}


class RelaySMTP(DefendedSession):
    """An SMTP session of a relay listener."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        self._txn: Transaction | None = None
        self._auth_user = ""
        self._client_ip = ""
        self._client_port = 0
        self._allowlisted = False
        self._implicit_tls = False
        self._refused: str | None = None        # why the connection is refused, if so
        self._counted = False
        self._finishing = False                 # storing a message: shutdown waits for it
        self._pipelinable = False               # the reply being made may wait (PIPELINING)
        self._closing = False
        self._slot: Any = ""                    # the client network's connection slot
        self._admission: asyncio.Future[str | None] | None = None   # asked of another process
        self.init_defences()
        self.init_state(hostname=ctx.hostname, timeout=cfg.command_timeout,
                        tls_context=ctx.tls_context if cfg.tls == "starttls" else None)

    # --- connection life cycle ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self._client_ip, self._client_port = str(peer[0]), int(peer[1])
        if self._client_ip.startswith("::ffff:"):
            self._client_ip = self._client_ip[7:]
        self._implicit_tls = transport.get_extra_info("sslcontext") is not None
        cfg = self.ctx.cfg
        try:
            ip = ipaddress.ip_address(self._client_ip)
            self._allowlisted = any(ip in net for net in cfg.allow)
        except ValueError:
            self._allowlisted = False
        counter = self.ctx.connections
        if isinstance(counter, ConnectionCounter):
            refused, self._slot = counter.admit(self._client_ip, Limits.of(cfg))
            self._admitted(refused)
        else:                 # several processes serve this listener: the main one counts
            self._slot, self._admission = counter.ask(self._client_ip, Limits.of(cfg))

    def tls_started(self) -> None:
        self._auth_user = ""                     # RFC 3207 4.2: forget pre-TLS state
        self.reset_transaction()
        self.tls_done()
        self.reset_timer()

    def _admitted(self, refused: str | None) -> None:
        cfg = self.ctx.cfg
        self._refused = refused
        metrics = self.ctx.metrics
        if refused is None:
            self._counted = True
            if metrics is not None:
                metrics.smtp_sessions.labels(cfg.name).inc()
        elif metrics is not None:
            metrics.connections_refused.labels(cfg.name, METRIC_REASON[refused]).inc()

    def connection_lost(self, error: Exception | None) -> None:
        if self._admission is not None:            # gone before the answer: give it back
            self._admission = None
            self.ctx.connections.release(self._slot)
        self._give_back()
        super().connection_lost(error)

    def _give_back(self) -> None:
        """Release the connection's slot (once)."""
        if self._counted:
            self._counted = False
            self.ctx.connections.release(self._slot)
            if self.ctx.metrics is not None:
                self.ctx.metrics.smtp_sessions.labels(self.ctx.cfg.name).dec()

    async def smtp_QUIT(self, arg: str | None) -> None:
        # The slot goes back before the 221: a client that reconnects on reading it (as
        # at its per-client limit) must not find its old connection still counted.
        if not arg:
            self._give_back()
        await super().smtp_QUIT(arg)

    async def refuse_at_connect(self) -> bool:
        if self._admission is not None:
            refused = await self._admission
            if self._admission is None:            # the connection is gone meanwhile
                return True
            self._admission = None
            self._admitted(refused)
            if refused == UNAVAILABLE:             # it may still count us: give it back
                self.ctx.connections.release(self._slot)
        if self._refused is None:
            return False
        reply = _REFUSALS[self._refused]
        # The main process did not answer: not the client's doing, and not a count.
        reason = "unavailable" if self._refused == UNAVAILABLE else "too_many_connections"
        self.ctx.refused(Refusal.from_reply(reply, reason),
                         info=None, client=self._client_ip, stage="CONNECT")
        await self.push(reply)
        self.close()
        return True

    def shutdown(self) -> None:
        """Tell the client the service is going away and close (used after drain timeout).

        A session that is storing a message first sends that message's reply, so a
        message on disk is never also answered with 421 (which would make it sent twice).
        """
        if self._finishing:
            self._closing = True
        elif self.transport is not None and not self.transport.is_closing():
            self._write_now(replies.SHUTTING_DOWN)
            self.close()

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and self.is_syntax_error(status) and \
                await self.junk_command(counted_as_command=False):
            return
        if isinstance(status, str):
            if not status.startswith(_RAW):
                status = with_enhanced(status)
            status = status.encode()
        data = bytes(status) + b"\r\n"
        # PIPELINING (RFC 2920): the replies to MAIL, RCPT and RSET wait while the client's
        # next command is already here, and leave together with the next reply (as
        # Postfix does), instead of one send() each.
        if self._pipelinable:
            self._pipelinable = False
            if self.has_line():
                self._held.append(data)
                return
        await self._send(data)

    async def send_lines(self, lines: list[str]) -> None:
        await self._send("".join(f"{line}\r\n" for line in lines).encode())

    def reset_transaction(self) -> None:
        self._txn = None

    # --- session facts ------------------------------------------------------------------

    @property
    def tls(self) -> bool:
        return self._implicit_tls or self.starttls_active

    def info(self) -> SessionInfo:
        return SessionInfo(
            listener=self.ctx.cfg.name, client_ip=self._client_ip,
            client_port=self._client_port, helo=self.state.host_name or "", tls=self.tls,
            auth_user=self._auth_user, allowlisted=self._allowlisted,
            trusted=bool(self._auth_user) or self._allowlisted)

    def _auth_offered(self) -> bool:
        return self.ctx.users is not None and (self.tls or self.ctx.cfg.allow_plaintext_auth)

    async def _refuse(self, refusal: Refusal, stage: str, *, sender: str | None = None,
                      recipient: str | None = None) -> None:
        reply = self.ctx.refused(refusal, info=self.info(), client=self._client_ip,
                                 stage=stage, sender=sender,
                                 recipients=(recipient,) if recipient is not None else ())
        await self.push(reply)

    # --- commands -----------------------------------------------------------------------

    async def smtp_HELO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        self.reset_transaction()
        self.state.extended_smtp = False
        self.state.host_name = hostname
        await self.send_lines([f"250 {self.hostname}"])

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self.reset_transaction()
        self.state.extended_smtp = True
        self.state.host_name = hostname
        lines = [self.hostname, "PIPELINING", f"SIZE {self.ctx.size_limit.size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and not self.tls:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        await self.send_lines([f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"])

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls:
            await self.push("503 5.5.1 Error: TLS already active")
            return
        if self._txn is not None:
            await self.push("503 5.5.1 Error: STARTTLS not permitted during a mail transaction")
            return
        if self.tls_context is None:
            await self.push("502 5.5.1 Error: STARTTLS not offered on this listener")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        self.start_tls_deadline()
        await self.start_tls(self.ctx.cfg.tls_handshake_timeout)

    async def smtp_RSET(self, arg: str | None) -> None:
        if await self.junk_command():
            return
        self._pipelinable = True
        await super().smtp_RSET(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._pipelinable = True
        if not self.state.host_name:
            await self.push(replies.NEED_EHLO)
            return
        if self._txn is not None:
            await self.push(replies.NESTED_MAIL)
            return
        cfg = self.ctx.cfg
        sender: str | None = None
        try:
            parsed = parse_command(arg, "FROM:", what="sender", null_ok=True,
                                   local_limit=False)
            sender, params = parsed.address, parsed.params
            smtputf8, body8 = mail_params(params, extended=bool(self.state.extended_smtp),
                                          max_size=self.ctx.size_limit.size,
                                          size_by=self.ctx.size_limit.by)
            info = self.info()
            if not info.trusted and not cfg.relay_domains:
                raise relay_refusal(auth_required=self._auth_wanted())
            if self.ctx.checks is not None:
                await self.ctx.checks.check_sender(info, sender, params)
            if (too_long := local_part_refusal(sender, "sender")) is not None:
                raise too_long
        except Refusal as r:
            await self._refuse(r, "MAIL", sender=sender)
            return
        self._txn = Transaction(sender=sender, smtputf8=smtputf8, body_8bitmime=body8)
        await self.push(replies.SENDER_OK)

    def _auth_wanted(self) -> bool:
        return self.ctx.cfg.auth == "required" and self.ctx.users is not None

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._pipelinable = True
        if not self.state.host_name:
            await self.push(replies.NEED_EHLO)
            return
        txn = self._txn
        if txn is None:
            await self.push(replies.NEED_MAIL)
            return
        cfg = self.ctx.cfg
        rcpt: str | None = None
        try:
            parsed = parse_command(arg, "TO:", what="recipient", null_ok=False,
                                   smtputf8=txn.smtputf8, local_limit=False)
            rcpt = parsed.address
            if parsed.params:
                raise Refusal(555, "5.5.4", "RCPT parameters not supported",
                              reason="bad_address")
            if len(txn.recipients) >= cfg.max_recipients:
                raise Refusal.from_reply(replies.TOO_MANY_RCPTS, "too_many_rcpts")
            info = self.info()
            if not info.trusted and not in_domains(domain_of(rcpt), cfg.relay_domains):
                raise relay_refusal(auth_required=self._auth_wanted())
            if self.ctx.checks is not None:
                await self.ctx.checks.check_recipient(info, txn.sender, rcpt,
                                                      tuple(txn.recipients))
            if (too_long := local_part_refusal(rcpt, "recipient")) is not None:
                raise too_long
        except Refusal as r:
            await self._refuse(r, "RCPT", sender=txn.sender, recipient=rcpt)
            return
        txn.recipients.append(rcpt)
        await self.push(replies.RCPT_OK)

    async def smtp_DATA(self, arg: str | None) -> None:
        if not self.state.host_name:
            await self.push(replies.NEED_EHLO)
            return
        txn = self._txn
        if txn is None:
            await self.push(replies.NEED_MAIL)
            return
        if not txn.recipients:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self.screening = False                  # message lines may start with anything
        await self.push(replies.START_DATA)
        event = await self.read_data()
        self.screening = True
        if event is None:
            return
        self._txn = None
        self.reset_timer()
        tls_version = None
        if self.tls:
            ssl_obj = self.transport.get_extra_info("ssl_object") if self.transport else None
            tls_version = ssl_obj.version() if ssl_obj is not None else None
        self._finishing = True
        try:
            reply = await finish_message(self.ctx, self.info(), txn, event,
                                         extended=bool(self.state.extended_smtp),
                                         tls_version=tls_version)
        finally:
            self._finishing = False
        self.reset_timer()
        if reply.startswith("250"):
            self.message_accepted()
        await self.push(reply)
        if self._closing:
            self.shutdown()

    async def smtp_AUTH(self, arg: str | None) -> None:
        await run_auth(self, arg)
