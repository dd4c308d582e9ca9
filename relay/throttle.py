"""The one login-failure throttle: growing delays, then refusal, per client network and account.

Used by SMTP AUTH and by the IMAP/POP3 proxy's logins alike. The first failure of a
client is answered at once; each further failure within ``window`` seconds waits
``base_delay * 2**(k-2)`` (capped at ``max_delay``) before its reply, as servers do to
slow down guessing. At ``limit`` failures the client is refused for ``window`` seconds.
A success clears the client's failures. IPv6 clients are counted per /64 (a host
usually holds a whole /64, and hopping addresses inside it must not reset the count);
both prefixes can be set per listener.

A distributed guess (a few tries at one account from each of many addresses) is caught
per account: a listener's throttle may share an ``accounts`` throttle, keyed by the
account name, with every other listener of the process (SMTP and IMAP/POP3 alike). Its
failures from any address slow the replies for that account the same way, and at its
limit logins to the account are refused for its window, whoever tries, the right
password included (it is not even checked). The start of each lockout is one WARNING
line naming the account or network (never a password) and ``relay_auth_lockouts_total``.
Across processes (SMTP listener processes and the main process with the IMAP/POP3
proxy), a listener process keeps a quiet replica that forwards each failure
(``on_failure``) to the main process's throttle, which counts them with its own and
tells every listener process of each lockout (``on_lock`` → ``lock``).
Memory is bounded: the least recently failing clients (or accounts) are forgotten first.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from relay.metrics import Metrics

log = logging.getLogger("relay.auth")


def client_key(addr: str, *, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The unit a client is counted in: its IPv4 address, or its IPv6 /64 (or the
    given prefixes: ``ipv4_prefix=24`` counts a whole /24 as one client)."""
    if addr.startswith("::ffff:"):
        addr = addr[7:]
    if ":" in addr:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_network(f"{addr}/{ipv6_prefix}", strict=False))
    elif ipv4_prefix < 32:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_network(f"{addr}/{ipv4_prefix}", strict=False))
    return addr


def account_key(user: str) -> str:
    """The unit an account is counted in: its name, case-insensitively."""
    return user.strip().casefold()


def shown(text: str) -> str:
    """A name from a client, safe in a log line (quoted, control characters escaped)."""
    body = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:128])
    return '"' + body.replace('"', '\\"') + '"'


def _span(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


class FailureThrottle:
    """Failed logins per client network (and, shared, per account); see the docstring."""

    def __init__(self, *, limit: int, window: float, base_delay: float = 1.0,
                 max_delay: float = 8.0, max_tracked: int = 10_000,
                 clock: Callable[[], float] = time.monotonic,
                 key: Callable[[str], str] = client_key, scope: str = "network",
                 accounts: FailureThrottle | None = None,
                 metrics: Metrics | None = None, quiet: bool = False,
                 on_failure: Callable[[str, str, str, str], None] | None = None,
                 on_lock: Callable[[str, float], None] | None = None) -> None:
        self.limit = limit
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.scope = scope
        self.accounts = accounts
        self.metrics = metrics
        self.quiet = quiet                  # a replica: the main process logs and counts
        self.on_failure = on_failure        # (name, client, listener, protocol) of each one
        self.on_lock = on_lock              # (name, seconds) when a lockout starts here
        self._key = key
        self._max_tracked = max_tracked
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked: dict[str, float] = {}

    @classmethod
    def for_accounts(cls, *, limit: int, window: float, base_delay: float = 1.0,
                     max_delay: float = 8.0, clock: Callable[[], float] = time.monotonic,
                     metrics: Metrics | None = None, quiet: bool = False,
                     on_failure: Callable[[str, str, str, str], None] | None = None,
                     on_lock: Callable[[str, float], None] | None = None) -> FailureThrottle:
        """The per-account throttle that every listener of a process shares."""
        if metrics is not None and not quiet:
            for protocol in ("smtp", "imap", "pop3"):
                for scope in ("network", "account"):
                    metrics.auth_lockouts.labels(protocol, scope)
        return cls(limit=limit, window=window, base_delay=base_delay, max_delay=max_delay,
                   clock=clock, key=account_key, scope="account", metrics=metrics,
                   quiet=quiet, on_failure=on_failure, on_lock=on_lock)

    def configure(self, *, limit: int, window: float,
                  key: Callable[[str], str] | None = None) -> None:
        """New limits (reload); what clients already earned is kept."""
        self.limit, self.window = limit, window
        if key is not None:
            self._key = key

    def blocked(self, addr: str, account: str | None = None) -> bool:
        """True while ``addr``'s network (or ``account``) is refused after its limit."""
        return self.refusal(addr, account) is not None

    def refusal(self, addr: str, account: str | None = None) -> str | None:
        """Why logins are refused now: ``"network"``, ``"account"``, or None."""
        if self._refused(self._key(addr)):
            return self.scope
        if account and self.accounts is not None and self.accounts.blocked(account):
            return self.accounts.scope
        return None

    def _refused(self, key: str) -> bool:
        until = self._blocked.get(key)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._blocked[key]
        return False

    def failures(self, addr: str) -> int:
        """Failures of ``addr``'s network still inside the window."""
        times = self._failures.get(self._key(addr))
        if not times:
            return 0
        now = self._clock()
        return sum(1 for t in times if now - t <= self.window)

    def failure(self, addr: str, account: str | None = None, *, listener: str = "",
                protocol: str = "") -> tuple[float, bool]:
        """Record a failure of ``addr`` (at ``account``): (seconds to wait before
        replying, now refused?). ``listener``/``protocol`` only name it in the log."""
        delay, refused = self._count(self._key(addr), addr, listener, protocol, addr)
        if account and self.accounts is not None:
            more, locked = self.accounts._count(account_key(account), account, listener,
                                                protocol, addr)
            delay, refused = max(delay, more), refused or locked
        return delay, refused

    def failed_elsewhere(self, name: str, client: str, listener: str,
                         protocol: str) -> tuple[float, bool]:
        """Count a failure another process saw (``name`` is a network's address or an
        account, as this throttle counts)."""
        return self._count(self._key(name), name, listener, protocol, client)

    def lock(self, name: str, seconds: float) -> None:
        """Refuse ``name`` for ``seconds`` (a lockout decided in another process)."""
        key = self._key(name)
        self._blocked[key] = max(self._blocked.get(key, 0.0), self._clock() + seconds)
        self._failures.pop(key, None)

    def remaining(self, name: str) -> float:
        """Seconds ``name`` stays refused (0 when it is not)."""
        return max(0.0, self._blocked.get(self._key(name), 0.0) - self._clock())

    def _count(self, key: str, name: str, listener: str, protocol: str,
               client: str) -> tuple[float, bool]:
        if self.on_failure is not None:
            self.on_failure(name, client, listener, protocol)
        now = self._clock()
        times = self._failures.pop(key, None) or deque()
        while times and now - times[0] > self.window:
            times.popleft()
        times.append(now)
        self._failures[key] = times
        while len(self._failures) > self._max_tracked:
            self._failures.popitem(last=False)
        count = len(times)
        if self.limit and count >= self.limit:
            self._blocked[key] = now + self.window
            self._failures.pop(key, None)
            if len(self._blocked) > self._max_tracked:
                for stale in [k for k, t in self._blocked.items() if t <= now]:
                    del self._blocked[stale]
            if not self.quiet:
                self._locked(name, key, listener, protocol, client)
            if self.on_lock is not None:
                self.on_lock(name, self.window)
            return 0.0, True
        if count < 2:
            return 0.0, False
        return min(self.base_delay * 2 ** (count - 2), self.max_delay), False

    def _locked(self, name: str, key: str, listener: str, protocol: str,
                client: str) -> None:
        if self.metrics is not None:
            self.metrics.auth_lockouts.labels(protocol or "-", self.scope).inc()
        where = f" on listener {listener}" if listener else ""
        if self.scope == "account":
            log.warning("account %s reached %d failed logins within %s (the last from %s%s"
                        "%s); logins to it are refused for %s, whoever tries\n  hint: a "
                        "password guess from several addresses; if it is the account's "
                        "owner, check the password the platform has", shown(name),
                        self.limit, _span(self.window), client, where,
                        f", {protocol}" if protocol else "", _span(self.window))
        else:
            log.warning("client %s reached %d failed logins within %s%s%s; it is refused "
                        "for %s", key, self.limit, _span(self.window), where,
                        f" ({protocol})" if protocol else "", _span(self.window))

    def success(self, addr: str, account: str | None = None) -> None:
        self._failures.pop(self._key(addr), None)
        if account and self.accounts is not None:
            self.accounts._failures.pop(account_key(account), None)
