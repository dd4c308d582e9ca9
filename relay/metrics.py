"""Every Prometheus metric relay exposes, defined in one place (relay_<what>_<unit>).

One ``Metrics`` instance per process owns its own ``CollectorRegistry`` (no globals);
components receive it and update it. Labels are bounded: listener/upstream/proxy/domain
names from config, reply classes, classified reasons, stages. Never addresses or subjects.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from relay import __version__

# Delivery stages, in the order a session goes through them.
STAGES = ("connect", "tls", "greeting", "auth", "envelope", "data")

# Queue states, each always exported (0 when empty) so dashboards and alerts see them.
QUEUE_STATES = ("active", "deferred", "held")

# Why a due message waits (relay_messages_waiting{reason}).
WAIT_REASONS = ("quota", "paused", "suspended", "connections")

# Delay added by pacing: from a fraction of a second to a day (a daily quota).
PACING_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                  3600.0, 7200.0, 21600.0, 86400.0)
# Why relay closed a session on purpose (relay_sessions_closed_total), by protocol.
SESSION_CLOSE_REASONS = {
    "smtp": ("junk", "not_protocol", "data_deadline", "timeout", "tls_timeout", "tls_failed"),
    "proxy": ("junk", "not_protocol", "login_deadline", "tls_timeout", "tls_failed"),
}
ADMISSION_REFUSALS = ("total", "client", "rate", "reserve", "unavailable")

# Buckets reaching past 10 s, with 10 s itself a bound (the Cisco document's threshold).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                   60.0, 120.0)


class Metrics:
    """All of relay's metrics, registered on a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Info("relay_build", "Build information.", registry=r)
        self.build_info.info({"version": __version__,
                              "python": platform.python_version()})

        # --- SMTP in
        self.messages_received = Counter(
            "relay_messages_received", "Messages accepted and spooled, by listener.",
            ["listener"], registry=r)
        self.messages_refused = Counter(
            "relay_messages_refused", "Messages or transactions refused, by listener and reason.",
            ["listener", "reason"], registry=r)
        self.smtp_sessions = Gauge(
            "relay_smtp_sessions", "Open SMTP sessions, by listener.", ["listener"], registry=r)
        self.auth_failures = Counter(
            "relay_auth_failures", "Failed client authentications, by listener and protocol.",
            ["listener", "protocol"], registry=r)

        # --- hostile clients and a host short of resources (accept loops, admission,
        # deadlines and session limits, login lockouts)
        self.accept_errors = Counter(
            "relay_accept_errors",
            "accept() failures of a server socket, by server and reason (descriptors, "
            "system_descriptors, memory, error).", ["server", "reason"], registry=r)
        self.tls_handshake_failures = Counter(
            "relay_tls_handshake_failures",
            "Client TLS handshakes that failed or did not finish in time, by listener and "
            "reason (failed, timeout).", ["listener", "reason"], registry=r)
        self.connections_refused = Counter(
            "relay_connections_refused",
            "Connections refused at admission, by listener and reason (total, client, rate, "
            "reserve).", ["listener", "reason"], registry=r)
        self.sessions_closed = Counter(
            "relay_sessions_closed",
            "Sessions relay closed on purpose, by listener and reason (junk, not_protocol, "
            "data_deadline, command_deadline, login_deadline).", ["listener", "reason"],
            registry=r)
        self.auth_lockouts = Counter(
            "relay_auth_lockouts",
            "Logins refused for a while after repeated failures, by protocol and scope "
            "(network, account).", ["protocol", "scope"], registry=r)

        # --- delivery
        self.messages_delivered = Counter(
            "relay_messages_delivered", "Recipients delivered, by upstream and reply class.",
            ["upstream", "reply_class"], registry=r)
        self.messages_deferred = Counter(
            "relay_messages_deferred",
            "Recipients deferred for retry, by upstream and reply class.",
            ["upstream", "reply_class"], registry=r)
        self.messages_bounced = Counter(
            "relay_messages_bounced", "Recipients bounced, by upstream and reply class.",
            ["upstream", "reply_class"], registry=r)
        self.delivery_stage_seconds = Histogram(
            "relay_delivery_stage_seconds",
            "Time spent in each stage of an upstream session, by upstream and stage.",
            ["upstream", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.delivery_seconds = Histogram(
            "relay_delivery_seconds", "Whole delivery attempt duration, by upstream.",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=r)
        self.slow_deliveries = Counter(
            "relay_slow_deliveries",
            "Deliveries slower than the threshold, by upstream and the stage that took longest.",
            ["upstream", "stage"], registry=r)
        self.upstream_failures = Counter(
            "relay_upstream_connection_failures",
            "Upstream connection failures, by upstream and classified reason.",
            ["upstream", "reason"], registry=r)

        # --- pacing
        self.messages_waiting = Gauge(
            "relay_messages_waiting",
            "Messages due but waiting, by upstream and reason (quota, paused by the provider, "
            "suspended after a connection failure, waiting for a connection).",
            ["upstream", "reason"], registry=r)
        self.pacing_delay = Histogram(
            "relay_pacing_delay_seconds",
            "Delay added by pacing: from when a message was due to when it was sent, by "
            "upstream.", ["upstream"], buckets=PACING_BUCKETS, registry=r)
        self.provider_pauses = Counter(
            "relay_provider_pauses",
            "Pauses after a provider's throttle reply, by upstream, scope (mailbox, "
            "upstream) and throttle-reply rule.", ["upstream", "scope", "rule"], registry=r)
        self.pacing_shared = Gauge(
            "relay_pacing_shared",
            "1 while quota accounting is whole (in this process, or shared through Redis); "
            "0 while Redis is unreachable and this replica counts only its local share.",
            registry=r)
        self.pacing_fallbacks = Counter(
            "relay_pacing_fallbacks",
            "Times Redis became unreachable and this replica fell back to its local share "
            "of each quota.", registry=r)

        # --- queue
        self.queue_messages = Gauge(
            "relay_queue_messages", "Messages in the queue, by state (active, deferred, held).",
            ["state"], registry=r)
        self.queue_oldest_age = Gauge(
            "relay_queue_oldest_message_age_seconds",
            "Age of the oldest queued message still being delivered (held mail excluded).",
            registry=r)

        # --- spool health and delivery records
        self.spool_writable = Gauge(
            "relay_spool_writable",
            "1 while the spool takes mail; 0 while it cannot be written or is below its reserve.",
            registry=r)
        self.spool_free_bytes = Gauge(
            "relay_spool_free_bytes", "Free space on the spool's filesystem, in bytes.",
            registry=r)
        self.spool_quarantined = Counter(
            "relay_spool_quarantined",
            "Damaged spool files moved to corrupt/ (recovery or a failed read).", registry=r)
        self.delivery_outcome_unknown = Counter(
            "relay_delivery_outcome_unknown",
            "Messages sent whose reply never came (connection lost or timed out after the "
            "data, or relay stopped before recording it): retried, so possibly delivered "
            "twice, by upstream.",
            ["upstream"], registry=r)
        self.delivery_unrecorded = Gauge(
            "relay_delivery_unrecorded_outcomes",
            "Delivery outcomes the spool could not record, kept in memory (not sent again "
            "while relay runs; a restart would send them again).", registry=r)

        # --- IMAP/POP3 proxy
        self.proxy_sessions = Gauge(
            "relay_proxy_sessions", "Open proxy sessions, by listener.", ["listener"], registry=r)
        self.proxy_sessions_total = Counter(
            "relay_proxy_sessions_started", "Proxy sessions started, by listener.",
            ["listener"], registry=r)
        self.proxy_login_failures = Counter(
            "relay_proxy_login_failures", "Proxy login failures, by listener and reason.",
            ["listener", "reason"], registry=r)
        self.proxy_bytes = Counter(
            "relay_proxy_bytes", "Bytes spliced by proxy sessions, by listener and direction.",
            ["listener", "direction"], registry=r)
        self.proxy_splices = Counter(
            "relay_proxy_splices", "Logged-in proxy sessions by how their bytes move: "
            "path=kernel (splice(2), neither side TLS) or transport (through asyncio).",
            ["listener", "path"], registry=r)
        self.proxy_connect_seconds = Histogram(
            "relay_proxy_upstream_connect_seconds",
            "Upstream connect time of proxy sessions, by upstream and stage.",
            ["upstream", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.proxy_upstream_change = Counter(
            "relay_proxy_upstream_change_sessions",
            "Open proxy sessions whose way to the upstream (proxy, tunnel, credentials) a "
            "reload changed, by listener and outcome: reconnected (ended at a safe point), "
            "kept (on_upstream_change = keep, or no safe point can be seen).",
            ["listener", "outcome"], registry=r)

        # --- DKIM, SPF, headers
        self.dkim_signatures = Counter(
            "relay_dkim_signatures", "DKIM signatures made, by domain and result.",
            ["domain", "result"], registry=r)
        self.spf_results = Counter(
            "relay_spf_results", "SPF evaluations, by listener and result.",
            ["listener", "result"], registry=r)
        self.protected_header_violations = Counter(
            "relay_protected_header_violations",
            "Messages whose protected headers differed between receipt and send (must be 0).",
            registry=r)

        # --- OAuth2, TLS, config
        self.oauth_token_expiry = Gauge(
            "relay_oauth_token_expiry_seconds", "Seconds until the cached token expires.",
            ["source"], registry=r)
        self.tls_cert_expiry = Gauge(
            "relay_tls_certificate_expiry_timestamp_seconds",
            "Expiry time of each listener's TLS certificate.", ["listener"], registry=r)
        self.config_reloads = Counter(
            "relay_config_reloads", "Config reload attempts, by result (success, failure).",
            ["result"], registry=r)
        self.config_last_reload = Gauge(
            "relay_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully.", registry=r)

        # Series that alerts use with rate()/increase() exist from the first scrape, so the
        # first failure is an increase from 0 rather than a series appearing at 1.
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        for state in QUEUE_STATES:
            self.queue_messages.labels(state).set(0)
        self.pacing_shared.set(1)
        self.spool_writable.set(1)

    def declare(self, *, listeners: Iterable[str] = (), upstreams: Iterable[str] = ()) -> None:
        """Create the zero-valued series of configured names (at start and after reload).

        Without this a counter's first increment creates its series at 1, which
        ``rate()``/``increase()`` cannot see, so an alert would miss the first slow delivery.
        """
        for listener in listeners:
            self.messages_received.labels(listener)
        for upstream in upstreams:
            self.delivery_seconds.labels(upstream)
            for stage in STAGES:
                self.slow_deliveries.labels(upstream, stage)
            for reason in WAIT_REASONS:
                self.messages_waiting.labels(upstream, reason)
            self.delivery_outcome_unknown.labels(upstream)

    def declare_hostile(self, listener: str, protocol: str) -> None:
        """Zero-valued series of a listener's admission refusals and closed sessions."""
        for reason in ADMISSION_REFUSALS:
            self.connections_refused.labels(listener, reason)
        for reason in SESSION_CLOSE_REASONS["smtp" if protocol == "smtp" else "proxy"]:
            self.sessions_closed.labels(listener, reason)

    def update_queue(self, counts: Mapping[str, int], oldest_received: float | None, *,
                     now: float | None = None) -> None:
        """Set queue size by state and the oldest message's age (0 when the queue is empty).

        ``counts`` maps a state to its message count (missing states are 0);
        ``oldest_received`` is the Unix time the oldest queued message was received.
        """
        for state in {*QUEUE_STATES, *counts}:
            self.queue_messages.labels(state).set(counts.get(state, 0))
        if oldest_received is None:
            self.queue_oldest_age.set(0)
        else:
            current = time.time() if now is None else now
            self.queue_oldest_age.set(max(0.0, current - oldest_received))

    def record_reload(self, *, success: bool, now: float | None = None) -> None:
        """Count a config load attempt; a success also stamps the last-good-load time."""
        self.config_reloads.labels("success" if success else "failure").inc()
        if success:
            self.config_last_reload.set(time.time() if now is None else now)
