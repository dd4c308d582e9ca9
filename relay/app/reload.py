"""A reload as a plan: prepare everything a new config needs, then commit it or abandon it.

``ReloadPlan.prepare`` reads nothing itself: given a validated Config it checks what
cannot change without a restart, builds every component (DKIM keys, users files, TLS
certificates, routes, deliverer), starts a moved metrics endpoint, binds the sockets of
new listeners and of the listener processes. Anything wrong raises there, and
``abandon`` undoes what was started: the running relay never sees half a config.
``commit`` then swaps, in an order that cannot fail half-way: proxies and token sources,
listeners (new ones in, removed ones retired with their sessions finishing, the others
reconfigured), the listener processes, the scheduler (deferred mail of an upstream whose
address, tunnel or credentials changed is due at once), the metrics endpoint. Mail in
the spool is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.app.components import Components, build
from relay.config.changes import changed_upstreams
from relay.config.schema import Config
from relay.errors import RelayError
from relay.listenproc.supervisor import Plan as WorkersPlan
from relay.ops.certexpiry import update_listener_expiry
from relay.ops.endpoint import MetricsServer
from relay.outbound.throttle_table import ThrottleTable
from relay.transports.factory import Transports, used_proxies

if TYPE_CHECKING:
    from relay.app.runtime import App, Listener

# [relay] settings the running processes were started with: only a restart changes them.
_RESTART_ONLY = ("smtp_processes", "event_loop")


@dataclass
class ReloadPlan:
    """What a reload will change, prepared and validated, not yet in effect."""

    app: App
    new: Config
    parts: Components
    new_server: MetricsServer | None = None
    workers: WorkersPlan | None = None
    started: dict[str, Listener] = field(default_factory=dict)   # new listeners, bound

    @classmethod
    async def prepare(cls, app: App, new: Config) -> ReloadPlan:
        """Build and bind everything ``new`` needs; raises RelayError, leaving no trace."""
        old = app.config
        if new.relay.spool != old.relay.spool:
            raise RelayError("relay.spool cannot change on reload",
                             hint="drain and restart relay to move the spool")
        for name in _RESTART_ONLY:
            if getattr(new.relay, name) != getattr(old.relay, name):
                raise RelayError(f"relay.{name} cannot change on reload",
                                 hint="restart relay (systemctl restart relay) to change it")
        if new.pacing != old.pacing:
            raise RelayError("[pacing] cannot change on reload (where quota usage is kept)",
                             hint="restart relay to change it; with several replicas, "
                                  "change every replica's [pacing] alike, one at a time")
        staged = Transports(new.proxies)          # proves every proxy entry builds
        try:
            parts = build(new, spool=app.spool, transports=app.transports, tokens=app.tokens,
                          metrics=app.metrics, dns_pool=app.dns_pool,
                          handovers=app.handovers)
        finally:
            await staged.close()
        await update_listener_expiry(app.metrics, new.listeners)
        plan = cls(app=app, new=new, parts=parts)
        try:
            if new.metrics.enabled and (not old.metrics.enabled
                                        or new.metrics.listen != old.metrics.listen):
                plan.new_server = app.metrics_server_for(new)
                await plan.new_server.start()
            if app.workers is not None:
                plan.workers = app.workers.prepare(new)
            for name, lp in app.local(parts).items():
                if name not in app.listeners:
                    listener = app.make_listener(lp, parts)
                    await listener.start()
                    plan.started[name] = listener
        except RelayError:
            await plan.abandon()
            raise
        return plan

    async def abandon(self) -> None:
        """Undo what ``prepare`` started; the running config stays as it was."""
        app = self.app
        if self.workers is not None and app.workers is not None:
            app.workers.abandon(self.workers)
        for listener in self.started.values():
            await listener.stop_accepting()
            await listener.wait_closed(0)
        self.started.clear()
        if self.new_server is not None:
            await self.new_server.stop()

    async def commit(self) -> tuple[str, list[str]]:
        """Swap the new config in; returns (summary, listener processes that refused it)."""
        app, new, parts = self.app, self.new, self.parts
        old = app.config
        app.transports.reconfigure(new.proxies, used=used_proxies(new))
        app.spool.health.configure(reserve=new.relay.spool_reserve)
        app.tokens.reconfigure(new.token_sources)
        app.accounts.configure(limit=new.relay.account_fail_limit,
                               window=new.relay.account_fail_window)
        local = app.local(parts)
        added = list(self.started)
        app.listeners.update(self.started)
        removed = [n for n in app.listeners if n not in local]
        for name in removed:
            app.retire(app.listeners.pop(name), new.relay.shutdown_grace)
        for name, lp in local.items():
            if name not in self.started:
                await app.reconfigure_listener(name, lp, parts)
        refused: list[str] = []
        if self.workers is not None and app.workers is not None:
            old_smtp = {lc.name for lc in old.listeners if lc.protocol == "smtp"}
            added += [n for n in self.workers.bound if n not in old_smtp]
            removed += [n for n in old_smtp if n not in self.workers.bound]
            refused = await app.workers.commit(self.workers)
        old_parts = app.parts
        app.parts, app.config = parts, new
        assert app.scheduler is not None
        # An upstream whose address, tunnel or credentials changed: its deferred mail is
        # tried now through the new way, its pauses and fail-fast window end.
        app.scheduler.reconfigure(router=parts.router, deliverer=parts.deliverer,
                                  retry=new.relay.retry,
                                  throttles=ThrottleTable(new.throttle_replies),
                                  changed=changed_upstreams(old, new))
        if old_parts is not None:
            app.background.spawn(old_parts.deliverer.close(), name="close-old-deliverer")
        app.background.spawn(app.transports.close_retired(), name="close-retired-transports")
        if self.new_server is not None or not new.metrics.enabled:
            old_server, app.metrics_server = app.metrics_server, self.new_server
            if old_server is not None:
                await old_server.stop()
        app.metrics.declare(listeners=list(parts.listeners),
                            upstreams=[u.name for u in new.upstreams])
        running = len(app.listeners) + (len(self.workers.bound) if self.workers else 0)
        return (f"config {app.config_path} applied: {len(added)} listeners added, "
                f"{len(removed)} removed, {running} running"), refused
