"""How far an upstream IMAP/POP3 login got: stage timings for the metrics and an observer.

``relay.proxy.upstream.login_upstream`` records the stages the proxy's metrics know
(connect, tls, greeting, auth in ``relay_proxy_upstream_connect_seconds``) and, when given
an ``Observer`` (``relay check``), tells it of each finer stage as it ends, failed or not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.config.schema import UpstreamConfig
from relay.errors import RelayError
from relay.metrics import Metrics
from relay.timing import StageTimer


@dataclass(frozen=True, slots=True)
class Stage:
    """One finished stage of a login, as an ``Observer`` sees it.

    In order: ``connect``, ``tls`` (implicit TLS), ``greeting``, ``capability`` (only when
    asked for), ``token`` (XOAUTH2; fetched while connecting, ``seconds`` is the fetch's
    own), ``tls`` (STARTTLS/STLS and the handshake), ``auth`` (detail: "logged in as U
    (MECHANISM)"). A stage that failed carries ``error``, which ``login_upstream`` raises
    right after; ``detail`` then says what was being done ("login as 'U' (LOGIN)").
    A stage that just began is told with ``running`` (for a "still waiting for ..." line).
    """

    name: str
    seconds: float
    detail: str = ""
    error: RelayError | None = None
    running: bool = False


Observer = Callable[[Stage], None]


class Progress:
    """The metric stages (connect, tls, greeting, auth) and the observer's finer ones."""

    def __init__(self, cfg: UpstreamConfig, metrics: Metrics | None,
                 observer: Observer | None) -> None:
        self.cfg, self.metrics, self.observer = cfg, metrics, observer
        self.timer = StageTimer()
        self.started = time.monotonic()
        self.current, self.doing = "connect", ""

    def metric(self, name: str) -> None:
        """Record the metric stage ``name``: the time since the previous one."""
        seconds = self.timer.lap(name)
        if self.metrics is not None:
            self.metrics.proxy_connect_seconds.labels(self.cfg.name, name).observe(seconds)

    @property
    def stages(self) -> dict[str, float]:
        return self.timer.stages

    def begin(self, name: str, doing: str = "") -> None:
        """The observer's stage ``name`` starts; ``doing`` describes it if it fails."""
        self.current, self.doing, self.started = name, doing, time.monotonic()
        if self.observer is not None:
            self.observer(Stage(name, 0.0, doing, running=True))

    def done(self, detail: Callable[[], str], seconds: float | None = None) -> None:
        """The current stage passed; ``detail`` is only worked out for an observer."""
        if self.observer is not None:
            took = time.monotonic() - self.started if seconds is None else seconds
            self.observer(Stage(self.current, took, detail()))

    def failed(self, error: RelayError, seconds: float | None = None) -> None:
        """The current stage failed with ``error`` (which the login raises next)."""
        if self.observer is not None:
            took = time.monotonic() - self.started if seconds is None else seconds
            self.observer(Stage(self.current, took, self.doing, error))
