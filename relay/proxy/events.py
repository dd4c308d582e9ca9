"""What the sans-IO pre-auth machines (IMAP, POP3) emit, and the interface they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from relay.config.schema import Secret

# Why a login did not happen; used for the client's reply and the metric label.
# "refused": the client's network is locked out (the session closes); "account_locked":
# the account is, after failures from anywhere (the client may try another).
LoginFailure = Literal["credentials", "unavailable", "refused", "account_locked"]


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to write to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Upgrade the client connection now; every byte received before it is discarded."""


@dataclass(frozen=True, slots=True)
class Login:
    """The client gave credentials: check them, log in upstream, then answer the machine."""

    user: str
    password: Secret
    mechanism: str            # "login", "user", "plain", "sasl-login": for the log only


@dataclass(frozen=True, slots=True)
class Close:
    """Close the client connection (after writing what came before)."""

    reason: str               # bounded label: "logout", "bad_input", "line_too_long", ...


Event = Send | StartTls | Login | Close


class PreAuth(Protocol):
    """A protocol's pre-authentication state machine: bytes in, events out, no sockets."""

    def greeting(self) -> bytes: ...

    def refuse(self, why: str) -> bytes:
        """The goodbye for a connection refused before its greeting (limits, bans)."""
        ...

    def receive(self, data: bytes) -> list[Event]: ...

    def tls_started(self) -> None: ...

    def login_succeeded(self, capability: str | None = None, untagged: bytes = b"") -> bytes:
        """The reply that completes the client's login (IMAP: tagged OK with capabilities)."""
        ...

    def login_failed(self, why: LoginFailure) -> list[Event]: ...

    def leftover(self) -> bytes:
        """Bytes the client pipelined after its login command: they go to the provider."""
        ...

    def timed_out(self) -> bytes: ...
