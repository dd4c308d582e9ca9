"""Composition root: builds relay from a Config; start, SIGHUP reload, SIGTERM drain.

Background tasks belong to ``self.background`` (relay.tasks). Start-up: spool lock, recovery,
metrics endpoint (so /healthz answers during recovery), the handover journal (what a
crashed process sent and never recorded is counted, before anything is sent again),
scheduler, listeners, control socket, readiness. A reload is a plan
(``relay.app.reload.ReloadPlan``): prepare builds, validates and binds everything the new
config needs, then commit swaps it in; anything wrong while preparing abandons the plan
and keeps the old config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from relay.app.components import Components, ListenerParts, build
from relay.app.eventloop import running as running_loop
from relay.app.reload import ReloadPlan
from relay.config.loader import load_config
from relay.config.schema import Config
from relay.control import paths
from relay.control.queue import QueueManager
from relay.control.socket import ControlServer
from relay.dns import lookup_pool
from relay.envelope import Envelope
from relay.errors import RelayError
from relay.listenproc.supervisor import ListenerProcesses, wait_for_old_listeners
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.oauth.tokens import TokenSources
from relay.ops.certexpiry import update_listener_expiry
from relay.ops.endpoint import MetricsServer
from relay.ops.sdnotify import SystemdNotifier
from relay.outbound.dsn import Bouncer
from relay.outbound.pacing import LocalQuotas, QuotaStore
from relay.outbound.scheduler import Scheduler
from relay.outbound.throttle_table import ThrottleTable
from relay.probe.spf import warn_failing_domains
from relay.proxy.listener import ProxyListener
from relay.proxy.upstream_path import upstream_path
from relay.smtp.listener import SmtpListener
from relay.spool.handovers import Handovers, take_over
from relay.spool.store import Spool
from relay.tasks import Background
from relay.throttle import FailureThrottle
from relay.transports.factory import Transports
from relay.verdict import Refusal

log = logging.getLogger("relay")
Listener = SmtpListener | ProxyListener


def pid_file(config: Config) -> Path:
    return paths.pid_path(config.relay)


def control_path(config: Config) -> Path:
    return paths.control_path(config.relay)


def quota_store(config: Config, metrics: Metrics) -> QuotaStore:
    """Where quota usage is kept: this process, or Redis shared by replicas ([pacing])."""
    if config.pacing.backend != "redis":
        return LocalQuotas()
    from relay.outbound.quota_redis import RedisQuotas  # redis-py only when configured

    log.info("pacing: quotas shared through Redis at %s by %d replica(s)",
             config.pacing.redis_url, config.pacing.replicas)
    return RedisQuotas(config.pacing, metrics=metrics)


# Signals whose default action would end the process, which relay does not use: ignored
# with a log line (scripts written for other daemons send USR1/USR2 to reopen logs).
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class App:
    """One running relay process."""

    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.config = config
        self.metrics = Metrics()
        self.maillog = MailLog()
        self.notifier = SystemdNotifier.from_environ()
        self.not_ready: str | None = "starting"
        self.spool = Spool(config.relay.spool, fsync=config.relay.fsync, metrics=self.metrics,
                           reserve=config.relay.spool_reserve)
        self.transports = Transports(config.proxies)
        self.dns_pool = lookup_pool()                 # SPF/DKIM lookups: never the spool's threads
        self.tokens = TokenSources(config.token_sources, transports=self.transports,
                                   metrics=self.metrics)
        # One per-account login throttle for every listener of this process.
        self.accounts = FailureThrottle.for_accounts(
            limit=config.relay.account_fail_limit, window=config.relay.account_fail_window,
            metrics=self.metrics, on_lock=self._account_locked)
        self.parts: Components | None = None
        self.scheduler: Scheduler | None = None
        self.listeners: dict[str, Listener] = {}      # in this process
        self.workers: ListenerProcesses | None = None  # SMTP listener processes
        if config.relay.smtp_processes > 0:
            self.workers = ListenerProcesses(config.relay.smtp_processes, spool=self.spool,
                                             metrics=self.metrics)
            self.workers.accounts = self.accounts       # SMTP AUTH counts with IMAP/POP3
        self.metrics_server: MetricsServer | None = None
        self.control: ControlServer | None = None
        self._stop = asyncio.Event()
        self._hard_stop = False
        self._reload_lock = asyncio.Lock()
        self.background = Background("relay", log)
        self._lock: Any = None
        self.quotas: QuotaStore | None = None
        self.handovers: Handovers | None = None        # the process's, across reloads

    # ---- start ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._lock = self.spool.lock()
        self.metrics.record_reload(success=True)
        self.metrics.declare(listeners=[lc.name for lc in cfg.listeners],
                             upstreams=[u.name for u in cfg.upstreams])
        if cfg.metrics.enabled:
            self.metrics_server = self.metrics_server_for(cfg)
            await self.metrics_server.start()
        if not await asyncio.to_thread(wait_for_old_listeners, cfg.relay.spool,
                                       cfg.relay.shutdown_grace + 10):
            log.error("listener processes of a previous relay still hold the spool; "
                      "recovering anyway (mail they acknowledge now waits for a restart)")
        recovered = await asyncio.to_thread(self.spool.recover)
        self.handovers = await asyncio.to_thread(
            take_over, self.spool.root, {m.queue_id for m in recovered}, self.metrics)
        await self.spool.health.refresh()
        self._spawn(self.spool.health.watch(), "spool-health")
        parts = build(cfg, spool=self.spool, transports=self.transports, tokens=self.tokens,
                      metrics=self.metrics, dns_pool=self.dns_pool, handovers=self.handovers)
        await update_listener_expiry(self.metrics, cfg.listeners)
        self.parts = parts
        self.quotas = quota_store(cfg, self.metrics)
        self.scheduler = Scheduler(
            spool=self.spool, router=parts.router, deliverer=parts.deliverer,
            retry=cfg.relay.retry, maillog=self.maillog, metrics=self.metrics,
            bouncer=Bouncer(spool=self.spool, hostname=cfg.relay.hostname,
                            bounce_from=cfg.relay.bounce_from, sign=self._sign_bounce),
            quotas=self.quotas, throttles=ThrottleTable(cfg.throttle_replies),
            handovers=self.handovers)
        self.spool.add_listener(self.scheduler.enqueue)
        await self.scheduler.start(recovered)
        for lp in self.local(parts).values():
            listener = self.make_listener(lp, parts)
            await listener.start()
            self.listeners[lp.cfg.name] = listener
        if self.workers is not None:
            await self.workers.start(cfg)
        self.control = ControlServer(
            QueueManager(self.spool, self.scheduler, maillog=self.maillog), control_path(cfg),
            commands={"reload": self._control_reload, "status": self._control_status})
        await self.control.start()
        self._write_pid(cfg)
        self._spawn(warn_failing_domains(cfg, parts.resolver), "spf-preflight")
        self._spawn(self.notifier.watchdog_loop(), "watchdog")
        self.not_ready = None
        status = f"{len(cfg.listeners)} listeners, {len(recovered)} messages queued"
        self.notifier.ready(status)
        log.info("relay started (%s; config %s; event loop %s)", status, self.config_path,
                 running_loop())

    async def _sign_bounce(self, envelope: Envelope, data: bytes) -> bytes:
        """DKIM-sign a DSN with the current config's keys (they change on reload)."""
        signer = self.parts.signer if self.parts is not None else None
        if signer is None:
            return data
        try:
            return await signer.maybe_sign(envelope, data)
        except Refusal as exc:               # nobody to refuse a bounce to: say so, send it
            log.warning("DSN %s sent unsigned: %s", envelope.dsn_of, exc.reply)
            return data

    def metrics_server_for(self, cfg: Config) -> MetricsServer:
        workers = self.workers
        return MetricsServer(metrics=self.metrics, listen=cfg.metrics.listen,
                             readiness=lambda: self.not_ready or self.spool.health.problem(),
                             before_scrape=self._before_scrape,
                             refresh=workers.refresh_metrics if workers else None,
                             view=workers.merged.view if workers else None)

    def _before_scrape(self) -> None:
        self.spool.update_metrics()
        if self.scheduler is not None:
            self.scheduler.update_metrics()

    def local(self, parts: Components) -> dict[str, ListenerParts]:
        """The listeners this process serves (all, or the non-SMTP ones)."""
        return {name: lp for name, lp in parts.listeners.items()
                if self.workers is None or lp.cfg.protocol != "smtp"}

    def make_listener(self, lp: ListenerParts, parts: Components) -> Listener:
        cfg = parts.config
        if lp.cfg.protocol == "smtp":
            assert lp.accept is not None
            return SmtpListener(lp.cfg, hostname=cfg.relay.hostname, accept=lp.accept,
                                maillog=self.maillog, checks=lp.checks, users=lp.users,
                                metrics=self.metrics, accounts=self.accounts)
        assert lp.authenticator is not None and lp.cfg.upstream is not None
        return ProxyListener(lp.cfg, upstream=cfg.upstream(lp.cfg.upstream),
                             authenticator=lp.authenticator,
                             transport_for=self.transports.for_upstream,
                             token_for=self.tokens.token, metrics=self.metrics,
                             path=upstream_path(cfg, lp.cfg.upstream),
                             accounts=self.accounts)

    def _write_pid(self, cfg: Config) -> None:
        path = pid_file(cfg)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(path)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self.background.spawn(coro, name=name)

    # ---- reload -----------------------------------------------------------------------

    async def reload(self) -> tuple[bool, str]:
        """Load, validate and swap the config; on any error keep the old one."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                message, refused = await self._reload()
            except RelayError as exc:
                self.metrics.record_reload(success=False)
                text = exc.explain()
                log.error("reload failed, still running the previous config: %s", text)
                self.notifier.ready("reload failed; previous config kept")
                return False, text
            if refused:
                self.metrics.record_reload(success=False)
                text = (f"{message}; but SMTP listener processes kept their previous config: "
                        + "; ".join(refused))
                log.error("reload: %s", text)
                self.notifier.ready("reload partly failed")
                return False, text
            self.metrics.record_reload(success=True)
            self.notifier.ready(message)
            log.info("reload: %s", message)
            return True, message

    async def _reload(self) -> tuple[str, list[str]]:
        new = await asyncio.to_thread(load_config, self.config_path)
        plan = await ReloadPlan.prepare(self, new)       # raises: nothing changed
        return await plan.commit()

    async def reconfigure_listener(self, name: str, lp: ListenerParts,
                                    parts: Components) -> None:
        current = self.listeners[name]
        cfg = parts.config
        if isinstance(current, SmtpListener) and lp.cfg.protocol == "smtp":
            old = current.config
            if old.listen == lp.cfg.listen and old.tls == lp.cfg.tls:
                current.reconfigure(lp.cfg, users=lp.users, checks=lp.checks,
                                    accept=lp.accept, hostname=cfg.relay.hostname)
                return
        elif isinstance(current, ProxyListener) and lp.cfg.protocol != "smtp":
            assert lp.authenticator is not None and lp.cfg.upstream is not None
            await current.reconfigure(lp.cfg, upstream=cfg.upstream(lp.cfg.upstream),
                                      authenticator=lp.authenticator,
                                      transport_for=self.transports.for_upstream,
                                      token_for=self.tokens.token,
                                      path=upstream_path(cfg, lp.cfg.upstream))
            return
        # Address, TLS mode or protocol changed: retire the old one, bind a new one.
        self.retire(current, cfg.relay.shutdown_grace)
        await asyncio.sleep(0)
        replacement = self.make_listener(lp, parts)
        await replacement.start()
        self.listeners[name] = replacement

    def retire(self, listener: Listener, grace: float) -> None:
        async def retire() -> None:
            await listener.stop_accepting()
            await listener.wait_closed(grace)
        self._spawn(retire(), "retire-listener")

    async def _control_reload(self, args: dict[str, Any]) -> dict[str, Any]:
        ok, message = await self.reload()
        return {"ok": ok, "message": message}

    async def _control_status(self, args: dict[str, Any]) -> dict[str, Any]:
        stats = self.spool.stats()
        return {"ok": True, "pid": os.getpid(), "config": str(self.config_path),
                "listeners": sorted(lc.name for lc in self.config.listeners),
                "listener_processes": self.workers.pids if self.workers else [],
                "ready": self.not_ready is None and self.spool.health.problem() is None,
                "queue": {"counts": dict(stats.counts), "oldest": stats.oldest_received}}

    # ---- stop -------------------------------------------------------------------------

    def request_stop(self) -> None:
        if self._stop.is_set():
            self._hard_stop = True
            log.warning("second stop signal: exiting now (the spool is consistent)")
            if self.workers is not None:
                self.workers.kill()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            return
        log.info("stopping: no new sessions; draining for up to %gs",
                 self.config.relay.shutdown_grace)
        self._stop.set()

    async def drain(self) -> None:
        grace = self.config.relay.shutdown_grace
        self.not_ready = "draining"
        self.notifier.stopping()
        for listener in self.listeners.values():
            await listener.stop_accepting()
        await asyncio.gather(*(lst.wait_closed(grace) for lst in self.listeners.values()),
                             *([self.workers.stop(grace)] if self.workers else []),
                             return_exceptions=True)
        if self.scheduler is not None:
            await self.scheduler.stop(grace=grace)
        if self.control is not None:
            await self.control.stop()
        if self.parts is not None:
            await self.parts.deliverer.close()
        if self.quotas is not None:
            await self.quotas.close()
        await self.transports.close()
        await self.background.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        with contextlib.suppress(OSError):
            pid_file(self.config).unlink()
        self.notifier.close()
        if self.handovers is not None:       # after the scheduler: its last records settle
            self.handovers.close()
        self.spool.close()
        self.dns_pool.shutdown(wait=False, cancel_futures=True)
        log.info("relay stopped")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload(), "reload"))
        for sig in IGNORED_SIGNALS:            # a stray kill -USR1 must not stop the mail
            loop.add_signal_handler(sig, self._ignored, sig)
        try:
            await self.start()
        except BaseException:
            await self.drain()
            raise
        await self._stop.wait()
        await self.drain()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *IGNORED_SIGNALS):
            loop.remove_signal_handler(sig)
        return 0

    def _account_locked(self, account: str, seconds: float) -> None:
        if self.workers is not None:
            self.workers.tell_locked(account, seconds)

    def _ignored(self, sig: signal.Signals) -> None:
        log.warning("received %s and ignored it: SIGHUP reloads the config, SIGTERM stops "
                    "relay", sig.name)
