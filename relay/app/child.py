"""Composition of an SMTP listener process: serves the sockets the main process hands it.

The main relay process binds every SMTP listener and passes the sockets over the
socketpair with the Config. This process builds the listener side of that config
(users, TLS, checks, DKIM, accept pipeline), serves the sockets, and stores accepted mail
in the spool itself (fsync before the 250, so durability never depends on the main
process), then tells the main process the queue id so delivery starts at once. A lost
notice is harmless: the main process's start-up recovery finds the file.

Requests from the main process: ``configure`` (start, reload), ``metrics`` (this
process's listener-side samples), ``stop`` (drain). EOF on the socketpair means the main
process is gone: stop accepting, let sessions finish, exit. SIGTERM/SIGINT drain too; a
second one exits at once. SIGHUP is the main process's business and is ignored here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import signal
import socket

from relay.app.listeners import build_listeners
from relay.config.schema import Config
from relay.dns import lookup_pool
from relay.listenproc.anvil import RemoteCounter
from relay.listenproc.channel import LOCK_NAME, ChannelClosed, Layout, Rpc
from relay.listenproc.merge import snapshot
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.smtp.listener import SmtpListener
from relay.spool.records import QueuedMessage
from relay.spool.store import Spool
from relay.tasks import Background
from relay.throttle import FailureThrottle, shown
from relay.tls import server_context

log = logging.getLogger("relay.listenproc")

INLINE_DATA = 1024 * 1024
# A stored message's bytes ride along to the main process only while the channel holds
# less than this for it unread; behind that (the main process cannot keep up), notices go
# without them and the first delivery attempt reads the spool. Without the bound, a
# listener process held every 100 KB message the main process had yet to read: 46-47 MB
# peak RSS per listener process when nothing rode along, 53-96 MB when everything did
# (bench/smtp_bench.py --scenario 100:20 --only relay).
INLINE_BACKLOG = 4 * 1024 * 1024


class ListenerProcess:
    """The state of one listener process; ``run()`` serves until told to stop."""

    def __init__(self, sock: socket.socket, admissions: socket.socket) -> None:
        self.metrics = Metrics()
        self.maillog = MailLog()
        self.config: Config | None = None
        self.spool: Spool | None = None
        self.listeners: dict[str, tuple[int, SmtpListener]] = {}
        self.accounts: FailureThrottle | None = None      # one for every listener here
        self._lock_fd: int | None = None
        self._configure_lock = asyncio.Lock()
        self._done = asyncio.Event()
        self._draining = False
        self.background = Background("listener process", log)
        self.dns_pool = lookup_pool()
        self.rpc = Rpc(sock, handlers={"configure": self._configure, "metrics": self._metrics,
                                       "stop": self._stop},
                       notices={"account_locked": self._account_locked,
                                "network_locked": self._network_locked},
                       on_eof=self._main_gone)
        # Connection admissions (several processes): their own channel, never queued
        # behind a stored message's notice.
        self.admissions = Rpc(admissions, handlers={}, notices={}, on_eof=lambda: None)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled)
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):   # the main process's
            loop.add_signal_handler(sig, lambda: None)
        await self._done.wait()
        self.rpc.close()
        self.admissions.close()
        if self.spool is not None:
            self.spool.close()
        self.dns_pool.shutdown(wait=False, cancel_futures=True)
        return 0

    # ---- configure ------------------------------------------------------------------------

    async def _configure(self, payload: tuple[Config, Layout], socks: list[socket.socket]
                         ) -> int:
        config, layout = payload
        given: dict[str, tuple[int, list[socket.socket]]] = {}
        rest = list(socks)
        for name, token, count in layout:
            given[name], rest = (token, rest[:count]), rest[count:]
        used: set[int] = set()
        try:
            async with self._configure_lock:
                if self._draining:
                    raise RuntimeError("draining; not reconfigured")
                await self._apply(config, given, used)
        finally:
            for s in socks:
                if id(s) not in used:
                    s.close()
        return os.getpid()

    async def _apply(self, config: Config, given: dict[str, tuple[int, list[socket.socket]]],
                     used: set[int]) -> None:
        if self.spool is None:
            self.spool = Spool(config.relay.spool, fsync=config.relay.fsync,
                               metrics=self.metrics, written=self._stored,
                               reserve=config.relay.spool_reserve)
            self._hold_lock(config)
        # Build and check everything first: an error leaves the running listeners alone.
        side = build_listeners(config, spool=self.spool, metrics=self.metrics, smtp_only=True,
                               dns_pool=self.dns_pool)
        if self.accounts is None:               # a replica: the main process logs, counts
            self.accounts = FailureThrottle.for_accounts(  # and tells us of its lockouts
                limit=config.relay.account_fail_limit,
                window=config.relay.account_fail_window, quiet=True,
                on_failure=self._auth_failed)
        hostname = config.relay.hostname
        for lp in side.listeners.values():
            if lp.cfg.tls != "none":
                server_context(lp.cfg)
        fresh: dict[str, tuple[int, SmtpListener]] = {}
        for name, lp in side.listeners.items():
            token, _ = given[name]
            token_now, current = self.listeners.get(name, (0, None))
            if current is not None and token_now == token and \
                    (current.config.tls, current.config.listen) == (lp.cfg.tls, lp.cfg.listen):
                continue
            assert lp.accept is not None
            shared = config.relay.smtp_processes > 1   # the main process counts for all
            fresh[name] = (token, SmtpListener(
                lp.cfg, hostname=hostname, accept=lp.accept, maillog=self.maillog,
                checks=lp.checks, users=lp.users, metrics=self.metrics,
                accounts=self.accounts,
                connections=RemoteCounter(
                    name, request=self.admissions.request,
                    notify=functools.partial(self.admissions.notify, now=True))
                if shared else None,
                on_failure=self._network_failed if shared else None))
        # Commit.
        for name, lp in side.listeners.items():
            if name not in fresh:
                self.listeners[name][1].reconfigure(lp.cfg, users=lp.users, checks=lp.checks,
                                                    accept=lp.accept, hostname=hostname)
        grace = config.relay.shutdown_grace
        for name in [n for n in self.listeners if n not in side.listeners]:
            self._retire(self.listeners.pop(name)[1], grace)
        for name, (token, listener) in fresh.items():
            old = self.listeners.pop(name, None)
            if old is not None:
                self._retire(old[1], grace)
            socks = given[name][1]
            used.update(id(s) for s in socks)
            await listener.start(socks)
            self.listeners[name] = (token, listener)
        self.config = config
        self.accounts.configure(limit=config.relay.account_fail_limit,
                                window=config.relay.account_fail_window)
        self.spool.health.configure(reserve=config.relay.spool_reserve)
        self.metrics.declare(listeners=list(side.listeners))

    def _hold_lock(self, config: Config) -> None:
        fd = os.open(config.relay.spool / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._lock_fd = fd

    def _retire(self, listener: SmtpListener, grace: float) -> None:
        async def retire() -> None:
            await listener.stop_accepting()
            await listener.wait_closed(grace)
        self.background.spawn(retire(), name="retire-listener")

    # ---- notices and metrics ----------------------------------------------------------------

    def _auth_failed(self, account: str, client: str, listener: str, protocol: str) -> None:
        with contextlib.suppress(ChannelClosed):
            self.rpc.notify("auth_failed", (account, client, listener, protocol))

    def _network_failed(self, addr: str, client: str, listener: str, protocol: str) -> None:
        with contextlib.suppress(ChannelClosed):
            self.rpc.notify("net_failed", (addr, client, listener, protocol))

    def _network_locked(self, payload: tuple[str, str, float]) -> None:
        listener, addr, seconds = payload
        held = self.listeners.get(listener)
        if held is not None:
            held[1].lock_network(addr, seconds)
            log.info("client %s refused here too on listener %s for %.0f s (locked out by "
                     "the main process)", addr, listener, seconds)

    def _account_locked(self, payload: tuple[str, float]) -> None:
        if self.accounts is not None:
            account, seconds = payload
            self.accounts.lock(account, seconds)
            log.info("account %s refused here too for %.0f s (locked out by the main "
                     "process)", shown(account), seconds)

    def _stored(self, msg: QueuedMessage, data: bytes) -> None:
        # The bytes ride along (small ones, while the main process keeps up) so the first
        # delivery attempt needs no re-read.
        inline = len(data) <= INLINE_DATA and \
            self.rpc.channel.backlog + len(data) <= INLINE_BACKLOG
        with contextlib.suppress(ChannelClosed):
            self.rpc.notify("stored", (msg, data if inline else None))

    async def _metrics(self, _payload: object, _socks: list[socket.socket]) -> object:
        return snapshot(self.metrics)

    # ---- stop -----------------------------------------------------------------------------

    async def _stop(self, grace: float, _socks: list[socket.socket]) -> int:
        await self._drain(grace)
        return os.getpid()

    def _main_gone(self) -> None:
        if self._draining:
            return
        log.warning("the main relay process is gone: no new sessions; finishing open ones")
        self._spawn_drain()

    def _signalled(self) -> None:
        if self._draining:
            log.warning("second stop signal: listener process exiting now")
            os._exit(1)
        self._spawn_drain()

    def _spawn_drain(self) -> None:
        grace = self.config.relay.shutdown_grace if self.config is not None else 0.0
        self.background.spawn(self._drain(grace), name="drain")

    async def _drain(self, grace: float) -> None:
        if self._draining:
            await self._done.wait()
            return
        self._draining = True
        listeners = [lst for _, lst in self.listeners.values()]
        for listener in listeners:
            await listener.stop_accepting()
        await asyncio.gather(*(lst.wait_closed(grace) for lst in listeners),
                             return_exceptions=True)
        await self.background.wait(timeout=grace + 5)
        self._done.set()
