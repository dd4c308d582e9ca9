"""The SSH transport (asyncssh): one kept-alive bastion connection, a channel per upstream.

Each ``connect()`` opens a direct-tcpip channel over the bastion connection and bridges it
to one end of a ``socket.socketpair()``; the caller gets the other end, a plain socket on
which TLS and STARTTLS work like on any other. The bastion's host key must be in
``known_hosts`` (never ignored). When the connection drops, the next ``connect()``
re-establishes it; after failures, attempts are spaced by an exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import warnings

with warnings.catch_warnings():
    # asyncssh still names DSA, which cryptography deprecates; relay never uses DSA keys,
    # and the warning on every `relay` command start would only confuse operators.
    warnings.filterwarnings("ignore", message=".*DSA.*", module="asyncssh")
    import asyncssh

from relay.config.schema import ProxyConfig
from relay.errors import TransportError

log = logging.getLogger("relay.transports.ssh")

_CHANNEL_CODES = {
    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED: (
        "administratively prohibited",
        "the bastion forbids TCP forwarding for this user or destination: set "
        "AllowTcpForwarding yes (and PermitOpen, if used, to the provider's host:port) in "
        "its sshd_config"),
    asyncssh.OPEN_CONNECT_FAILED: (
        "the bastion could not connect",
        "the bastion cannot reach the destination: check the upstream's host and port, and "
        "DNS and the outbound firewall on the bastion"),
    asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE: (
        "direct-tcpip not supported", "the SSH server does not do TCP forwarding"),
    asyncssh.OPEN_RESOURCE_SHORTAGE: (
        "resource shortage", "the bastion is out of sessions (MaxSessions) or resources"),
}


class SshTransport:
    """Connects through an SSH bastion with key auth and verified host keys."""

    def __init__(self, cfg: ProxyConfig, *, backoff_initial: float = 1.0,
                 backoff_max: float = 60.0, keepalive: float = 30.0) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._keepalive = keepalive
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._failures = 0
        self._next_attempt = 0.0
        self._last_error: TransportError | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._closed = False
        self._retired = False

    @property
    def where(self) -> str:
        return f"SSH bastion {self.cfg.name} ({self.cfg.host}:{self.cfg.port})"

    async def connect(self, host: str, port: int, *, timeout: float) -> socket.socket:
        sock, _timings = await self.connect_timed(host, port, timeout=timeout)
        return sock

    async def connect_timed(self, host: str, port: int, *,
                            timeout: float) -> tuple[socket.socket, dict[str, float]]:
        """Connect and report ``{"ssh_connect": s, "ssh_channel": s}`` (0 when reused)."""
        started = time.monotonic()
        for attempt in (1, 2):
            conn = await self._connection(max(0.1, timeout - (time.monotonic() - started)))
            ready = time.monotonic()
            try:
                async with asyncio.timeout(max(0.1, timeout - (ready - started))):
                    reader, writer = await conn.open_connection(host, port)
                break
            except asyncssh.ChannelOpenError as exc:
                if conn.is_closed() and attempt == 1:
                    self._drop(conn)      # the bastion went away: reconnect once, now
                    continue
                name, hint = _CHANNEL_CODES.get(exc.code, ("refused", "see the bastion's log"))
                raise TransportError(
                    f"{self.where} refused the channel to {host}:{port}: {name} "
                    f"({exc.reason or 'no reason given'})", reason="ssh_channel_refused",
                    hint=hint) from None
            except TimeoutError:
                raise TransportError(f"{self.where} did not open a channel to {host}:{port} "
                                     f"in time", reason="ssh_channel_refused",
                                     hint="the bastion is slow to reach the destination"
                                     ) from None
            except (asyncssh.Error, OSError) as exc:
                self._drop(conn)
                if attempt == 1:
                    continue
                raise TransportError(f"{self.where}: connection lost while opening a channel "
                                     f"to {host}:{port}: {exc}",
                                     reason="ssh_bastion_unreachable",
                                     hint="the next connection attempt reconnects") from None
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        task = asyncio.create_task(self._bridge(ours, reader, writer),
                                   name=f"ssh-pump {self.name} {host}:{port}")
        self._pumps.add(task)
        task.add_done_callback(self._channel_ended)
        return theirs, {"ssh_connect": ready - started, "ssh_channel": time.monotonic() - ready}

    async def _connection(self, timeout: float) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._closed:
                raise TransportError(f"{self.where}: transport closed (config reloaded)",
                                     reason="ssh_bastion_unreachable",
                                     hint="the next attempt uses the new config")
            conn = self._conn
            if conn is not None and not conn.is_closed():
                return conn
            self._conn = None
            now = time.monotonic()
            if now < self._next_attempt and self._last_error is not None:
                wait = self._next_attempt - now
                raise TransportError(f"{self._last_error} (next attempt in {wait:.1f}s)",
                                     reason=self._last_error.reason,
                                     hint=self._last_error.hint)
            try:
                conn = await self._open(timeout)
            except TransportError as exc:
                self._failures += 1
                delay = min(self._backoff_max,
                            self._backoff_initial * 2 ** (self._failures - 1))
                self._next_attempt = time.monotonic() + delay
                self._last_error = exc
                log.warning("%s; retrying the bastion in %.1fs", exc, delay)
                raise
            if self._failures:
                log.info("%s: reconnected after %d failed attempts", self.where, self._failures)
            self._failures = 0
            self._last_error = None
            self._conn = conn
            return conn

    async def _open(self, timeout: float) -> asyncssh.SSHClientConnection:
        cfg = self.cfg
        if cfg.known_hosts is None:
            raise TransportError(f"{self.where}: no known_hosts configured",
                                 reason="ssh_config",
                                 hint="set known_hosts on the [[proxy]]; relay never connects "
                                      "to a bastion whose host key it cannot verify")
        try:
            # Key and known_hosts files are read off the loop; asyncssh would read them inline.
            known = await asyncio.to_thread(asyncssh.read_known_hosts, str(cfg.known_hosts))
            keys = ([await asyncio.to_thread(asyncssh.read_private_key, str(cfg.key_file))]
                    if cfg.key_file else None)
            return await asyncssh.connect(
                cfg.host, cfg.port, username=cfg.username or None, config=None,
                known_hosts=known, agent_path=None, client_keys=keys,
                password=cfg.password.reveal() if cfg.password else None, kbdint_auth=False,
                connect_timeout=min(timeout, cfg.connect_timeout),
                keepalive_interval=self._keepalive, keepalive_count_max=3)
        except asyncssh.HostKeyNotVerifiable as exc:
            presented = await self._presented_key(timeout)
            raise TransportError(
                f"{self.where} presented a host key that does not match known_hosts "
                f"{cfg.known_hosts}{presented} ({exc.reason})",
                reason="ssh_host_key_mismatch",
                hint="if the bastion was rebuilt, verify its new key fingerprint out of band "
                     f"and update known_hosts (ssh-keyscan -p {cfg.port} {cfg.host}); "
                     "otherwise the connection may be intercepted") from None
        except asyncssh.PermissionDenied as exc:
            how = "key" if cfg.key_file else "password"
            fix = (f"add the public key of {cfg.key_file} to that user's authorized_keys on "
                   "the bastion" if cfg.key_file else "check the [[proxy]] password")
            raise TransportError(
                f"{self.where} refused {how} authentication for user '{cfg.username}' "
                f"({exc.reason})", reason="ssh_auth_failed",
                hint=f"{fix}, and check the user name in the [[proxy]] url") from None
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
            raise TransportError(f"{self.where}: cannot use key_file {cfg.key_file}: {exc}",
                                 reason="ssh_config",
                                 hint="key_file must be an unencrypted OpenSSH or PEM private "
                                      "key readable by relay") from None
        except TimeoutError:
            raise TransportError(
                f"connect timed out: {self.where} did not complete the SSH connection",
                reason="ssh_bastion_unreachable",
                hint="check that the bastion runs and this host may reach it (firewall)"
            ) from None
        except asyncssh.Error as exc:
            raise TransportError(f"{self.where}: SSH connection failed: {exc.reason}",
                                 reason="ssh_bastion_unreachable",
                                 hint="check the bastion's sshd log") from None
        except OSError as exc:
            if exc.filename in (str(cfg.key_file), str(cfg.known_hosts)):
                raise TransportError(f"{self.where}: cannot read {exc.filename}: "
                                     f"{exc.strerror}", reason="ssh_config",
                                     hint="check the path and permissions") from None
            raise TransportError(f"{self.where}: cannot connect: {exc.strerror or exc}",
                                 reason="ssh_bastion_unreachable",
                                 hint="check that the bastion runs and this host may reach "
                                      "it (firewall), and the [[proxy]] host and port"
                                 ) from None

    async def _presented_key(self, timeout: float) -> str:
        """Best effort: the fingerprint the bastion presents, for the mismatch message."""
        try:
            async with asyncio.timeout(min(timeout, 5.0)):
                key = await asyncssh.get_server_host_key(self.cfg.host, self.cfg.port,
                                                         config=None)
        except (OSError, asyncssh.Error, TimeoutError):
            return ""
        return f" (it presented {key.get_algorithm()} {key.get_fingerprint()})" if key else ""

    def _drop(self, conn: asyncssh.SSHClientConnection) -> None:
        if self._conn is conn:
            self._conn = None
        conn.close()

    async def _bridge(self, sock: socket.socket, reader: asyncssh.SSHReader[bytes],
                      writer: asyncssh.SSHWriter[bytes]) -> None:
        """Pump bytes both ways between the local socket and the SSH channel."""
        lreader, lwriter = await asyncio.open_connection(sock=sock)

        async def to_channel() -> None:
            while data := await lreader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()

        async def from_channel() -> None:
            while data := await reader.read(65536):
                lwriter.write(data)
                await lwriter.drain()
            if lwriter.can_write_eof():
                lwriter.write_eof()

        tasks = [asyncio.ensure_future(to_channel()), asyncio.ensure_future(from_channel())]
        try:
            # Each direction ends at its EOF (half-close is passed on); an error in either
            # direction ends both.
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in pending:
                t.cancel()
            for t in done:
                exc = t.exception()
                if exc is not None and not isinstance(exc, (OSError, asyncssh.Error)):
                    log.warning("%s: channel pump failed: %r", self.where, exc)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            lwriter.close()
            with contextlib.suppress(OSError, asyncssh.Error):
                await lwriter.wait_closed()

    def _channel_ended(self, task: asyncio.Task[None]) -> None:
        self._pumps.discard(task)
        if self._retired and not self._pumps:
            self._close_connection()

    def retire(self) -> None:
        """A reload replaced this bastion: no new channels, and the connection closes as
        soon as its last channel (a proxy session, a pooled delivery) has ended."""
        self._closed = self._retired = True
        if not self._pumps:
            self._close_connection()

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            log.info("%s: replaced by a reload and no connection uses it any more: SSH "
                     "connection closed", self.where)
            conn.close()

    async def close(self) -> None:
        """Close the bastion connection and every open channel; idempotent."""
        self._closed = True
        for task in list(self._pumps):
            task.cancel()
        if self._pumps:
            await asyncio.gather(*self._pumps, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()
