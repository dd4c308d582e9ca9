"""The main process's side of SMTP listener processes: bind, spawn, feed, respawn, stop.

``ListenerProcesses`` binds every SMTP listener's socket here (so "address in use" and
reload binding stay in one place), starts ``[relay] smtp_processes`` fresh interpreters
(``python -m relay.listenproc``; never a fork of this process's running loop and threads),
hands each the Config and the listening sockets over a socketpair (SCM_RIGHTS), and turns
their "stored" notices into ``Spool.adopt()`` so the scheduler sees new mail at once.
Their "auth_failed" notices count against the main process's per-account login throttle
(``accounts``), whose lockouts go back to every listener process ("account_locked").
With more than one process, the main process also keeps each listener's connection
counts ("admit", "release") and failed logins per client network ("net_failed", then
"network_locked" to all), so per-client limits stay exact (``relay.listenproc.anvil``).
A process that dies is logged and respawned with backoff and given the sockets again;
connections wait in the kernel's backlog meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from relay.config.schema import Config, HostPort
from relay.errors import RelayError
from relay.listenproc.anvil import Admissions, Anvil, NetworkFailures
from relay.listenproc.channel import LOCK_NAME, ChannelClosed, Layout, RemoteError, Rpc
from relay.listenproc.merge import MergedMetrics
from relay.metrics import Metrics
from relay.smtp.listener import bind_listener_sockets
from relay.spool.records import QueuedMessage
from relay.spool.store import Spool
from relay.throttle import FailureThrottle

log = logging.getLogger("relay.listenproc")

CONFIGURE_TIMEOUT = 60.0
METRICS_TIMEOUT = 2.0
BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER = 0.2, 10.0, 30.0


@dataclass
class Bound:
    """The listening sockets of one listener, as bound by the main process."""

    token: int
    listen: HostPort
    socks: list[socket.socket]


@dataclass
class Plan:
    """A reload's sockets: bound before the commit, so a bind error changes nothing."""

    config: Config
    bound: dict[str, Bound]
    new: list[Bound] = field(default_factory=list)
    retired: list[Bound] = field(default_factory=list)


@dataclass
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    rpc: Rpc | None = None
    admissions: Rpc | None = None        # "admit" and "release" only


def wait_for_old_listeners(spool_root: Path, timeout: float) -> bool:
    """Blocking: wait until no listener process of an earlier relay holds the spool.

    Listener processes outlive a killed main process while their sessions finish; the
    spool must not be recovered (tmp/ cleaned) under them. False if they did not end.
    """
    spool_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(spool_root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                if not logged:
                    log.warning("SMTP listener processes of a previous relay are still "
                                "finishing sessions; waiting up to %gs", timeout)
                    logged = True
                time.sleep(0.1)
    finally:
        os.close(fd)


class ListenerProcesses:
    """N listener processes serving every SMTP listener of the current config."""

    def __init__(self, count: int, *, spool: Spool, metrics: Metrics | None = None) -> None:
        self.count = count
        self.anvil = Anvil()
        self.admissions = Admissions(self.anvil, read_pending=self._read_admissions,
                                     live=self._live)
        self.networks = NetworkFailures(metrics=metrics, on_lock=self._network_locked)
        self.merged = MergedMetrics()
        self._spool = spool
        self._config: Config | None = None
        self._bound: dict[str, Bound] = {}
        self._tokens = itertools.count(1)
        self._slots = [_Slot(i) for i in range(count)]
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.accounts: FailureThrottle | None = None    # the main process's, set by the app

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots
                if s.proc is not None and s.proc.returncode is None]

    # ---- start and reload ---------------------------------------------------------------

    def prepare(self, config: Config) -> Plan:
        """Bind what the config needs beyond the current sockets; RelayError on failure."""
        free = {b.listen: b for b in self._bound.values()}
        plan = Plan(config=config, bound={})
        try:
            for lc in config.listeners:
                if lc.protocol != "smtp":
                    continue
                reuse = free.pop(lc.listen, None)
                if reuse is None:
                    reuse = Bound(next(self._tokens), lc.listen, bind_listener_sockets(lc))
                    plan.new.append(reuse)
                plan.bound[lc.name] = reuse
        except RelayError:
            self.abandon(plan)
            raise
        plan.retired = list(free.values())
        return plan

    def abandon(self, plan: Plan) -> None:
        """Close the sockets a plan bound (the reload failed elsewhere)."""
        for b in plan.new:
            for s in b.socks:
                s.close()
        plan.new.clear()

    async def start(self, config: Config) -> None:
        plan = self.prepare(config)
        self._config, self._bound = config, plan.bound
        self.networks.configure([lc for lc in config.listeners if lc.protocol == "smtp"])
        try:
            await asyncio.gather(*(self._spawn(slot) for slot in self._slots))
        except (RelayError, ChannelClosed, RemoteError, TimeoutError) as exc:
            raise RelayError(f"SMTP listener processes did not start: {exc}",
                             hint="see the log lines above from the listener processes") \
                from None
        self._tasks = [asyncio.ensure_future(self._watch(slot)) for slot in self._slots]
        log.info("SMTP listeners served by %d process(es) (pids %s)", self.count,
                 ", ".join(map(str, self.pids)))

    async def commit(self, plan: Plan) -> list[str]:
        """Hand every process the new config and sockets; the errors of those that refused."""
        self._config, self._bound = plan.config, plan.bound
        self.networks.configure([lc for lc in plan.config.listeners if lc.protocol == "smtp"])
        slots = [s for s in self._slots if s.rpc is not None and not s.rpc.channel.closed]
        results = await asyncio.gather(*(self._configure(s) for s in slots),
                                       return_exceptions=True)
        errors = [f"listener process {s.proc.pid if s.proc else '?'}: {r}"
                  for s, r in zip(slots, results, strict=True) if isinstance(r, BaseException)]
        for b in plan.retired:
            for s in b.socks:
                s.close()
        return errors

    async def _configure(self, slot: _Slot) -> None:
        assert slot.rpc is not None and self._config is not None
        layout: Layout = []
        fds: list[int] = []
        for name, b in self._bound.items():
            layout.append((name, b.token, len(b.socks)))
            fds += [s.fileno() for s in b.socks]
        await slot.rpc.call("configure", (self._config, layout), fds=fds,
                            timeout=CONFIGURE_TIMEOUT)

    async def _spawn(self, slot: _Slot) -> None:
        assert self._config is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours_a, theirs_a = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay.listenproc", str(theirs.fileno()),
                self._config.relay.log_level, str(theirs_a.fileno()),
                self._config.relay.event_loop,
                pass_fds=[theirs.fileno(), theirs_a.fileno()], stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            ours_a.close()
            raise RelayError(f"cannot start an SMTP listener process: {exc}",
                             hint="check that the Python interpreter can be run") from None
        finally:
            theirs.close()
            theirs_a.close()
        pid = slot.proc.pid
        slot.rpc = Rpc(ours, handlers={},
                       notices={"stored": self._stored, "auth_failed": self._auth_failed,
                                "net_failed": self.networks.failed},
                       on_eof=lambda: None)
        slot.admissions = Rpc(ours_a, handlers={},
                              quick={"admit": functools.partial(self.admissions.admit, pid)},
                              notices={"release": functools.partial(self.admissions.release,
                                                                    pid)},
                              on_eof=lambda: None)
        await self._configure(slot)

    def _read_admissions(self) -> None:
        for slot in self._slots:
            if slot.admissions is not None:
                slot.admissions.channel.read_pending()

    def _live(self) -> set[int]:
        return {s.proc.pid for s in self._slots if s.proc is not None
                and s.admissions is not None and not s.admissions.channel.closed}

    def _stored(self, payload: tuple[QueuedMessage, bytes | None]) -> None:
        self._spool.adopt(*payload)

    def _auth_failed(self, payload: tuple[str, str, str, str]) -> None:
        """A listener process saw a failed login to an account: count it here too."""
        if self.accounts is None:
            return
        account = payload[0]
        self.accounts.failed_elsewhere(*payload)
        left = self.accounts.remaining(account)
        if left:                              # locked (now or before this process knew it)
            self.tell_locked(account, left)

    def _network_locked(self, listener: str, addr: str, seconds: float) -> None:
        """Every listener process refuses logins from ``addr``'s network on ``listener``."""
        self._tell("network_locked", (listener, addr, seconds))

    def _tell(self, kind: str, payload: object) -> None:
        for slot in self._slots:
            if slot.rpc is not None and not slot.rpc.channel.closed:
                with contextlib.suppress(ChannelClosed):
                    slot.rpc.notify(kind, payload)

    def tell_locked(self, account: str, seconds: float) -> None:
        """Every listener process refuses ``account`` for ``seconds`` from now."""
        self._tell("account_locked", (account, seconds))

    async def _watch(self, slot: _Slot) -> None:
        """Respawn the slot's process whenever it exits, with backoff."""
        backoff = BACKOFF_FIRST
        while True:
            started = time.monotonic()
            assert slot.proc is not None
            code = await slot.proc.wait()
            pid = slot.proc.pid
            self.merged.retire(pid)
            for rpc in (slot.rpc, slot.admissions):
                if rpc is not None:
                    rpc.close()
            self.anvil.forget(pid)         # its sessions are gone with it
            if self._stopping:
                return
            if time.monotonic() - started > STABLE_AFTER:
                backoff = BACKOFF_FIRST
            log.error("SMTP listener process %d exited unexpectedly (%s); starting another "
                      "in %.1fs", pid, _describe(code), backoff)
            while not self._stopping:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                try:
                    await self._spawn(slot)
                    log.info("SMTP listener process %d replaces %d", slot.proc.pid, pid)
                    break
                except (RelayError, ChannelClosed, RemoteError, TimeoutError) as exc:
                    log.error("SMTP listener process did not start: %s; retrying in %.1fs",
                              exc, backoff)
                    if slot.proc is not None and slot.proc.returncode is None:
                        slot.proc.kill()
                        await slot.proc.wait()
            if self._stopping:
                return

    # ---- metrics ----------------------------------------------------------------------------

    async def refresh_metrics(self) -> None:
        """Fetch each process's listener-side samples; a slow one keeps its last values."""
        slots = [s for s in self._slots if s.rpc is not None and s.proc is not None
                 and s.proc.returncode is None and not s.rpc.channel.closed]

        async def one(slot: _Slot) -> None:
            assert slot.rpc is not None and slot.proc is not None
            try:
                snap = await slot.rpc.call("metrics", timeout=METRICS_TIMEOUT)
            except (TimeoutError, ChannelClosed, RemoteError) as exc:
                log.warning("listener process %d gave no metrics (%s); serving its last "
                            "values", slot.proc.pid, exc or "timed out")
                return
            self.merged.update(slot.proc.pid, snap)
        await asyncio.gather(*(one(s) for s in slots))

    # ---- stop -------------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Drain: processes stop accepting, let sessions finish within ``grace``, exit."""
        self._stopping = True
        live = [s for s in self._slots if s.proc is not None and s.proc.returncode is None]
        calls = [asyncio.ensure_future(s.rpc.call("stop", grace, timeout=grace + 15))
                 for s in live if s.rpc is not None and not s.rpc.channel.closed]
        await asyncio.sleep(0)
        self._close_sockets()
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)
        for slot in live:
            assert slot.proc is not None
            try:
                await asyncio.wait_for(slot.proc.wait(), 10)
            except TimeoutError:
                log.error("SMTP listener process %d did not exit; killing it", slot.proc.pid)
                slot.proc.kill()
                await slot.proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kill(self) -> None:
        """Second stop signal: end every listener process now."""
        self._stopping = True
        for slot in self._slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for b in self._bound.values():
            for s in b.socks:
                s.close()


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
