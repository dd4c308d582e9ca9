"""Who relay is toward the provider for a proxy client: passthrough or a mapped account.

``Authenticator`` is what a proxy session (``relay.proxy.session``) asks at login;
``build_authenticator`` picks the one an upstream's ``auth`` setting calls for.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from relay.config.schema import AccountConfig, Secret, UpstreamConfig
from relay.errors import ConfigError
from relay.proxy.upstream import UpstreamCredentials

# Checks a client's user name and password against relay's users file.
Verify = Callable[[str, Secret], Awaitable[bool]]


class Authenticator(Protocol):
    """Checks a client's credentials and says who relay is toward the provider.

    Returns ``None`` when the credentials are wrong. For ``auth = "passthrough"`` it
    returns the client's own credentials unchecked (the provider decides).
    """

    passthrough: bool

    async def login(self, user: str, password: Secret) -> UpstreamCredentials | None: ...


class PassthroughAuthenticator:
    """``auth = "passthrough"``: the client's own credentials go to the provider unchecked."""

    passthrough = True

    async def login(self, user: str, password: Secret) -> UpstreamCredentials | None:
        return UpstreamCredentials(username=user, password=password)


class MappedAuthenticator:
    """Checks the client against relay's users and maps it to a provider account.

    ``auth = "password"`` uses the account's (or upstream's) username and password;
    ``auth = "xoauth2"`` uses its token source. An ``[[account]]`` with ``user`` set
    applies to that relay user; one without ``user`` (and without ``sender``) is the
    default for every relay user of the upstream.
    """

    passthrough = False

    def __init__(self, *, upstream: UpstreamConfig, accounts: Sequence[AccountConfig],
                 verify: Verify) -> None:
        if upstream.auth not in ("password", "xoauth2"):
            raise ConfigError(f"upstream {upstream.name}: auth = \"{upstream.auth}\" cannot "
                              "be used by an IMAP/POP3 proxy listener", key="upstream.auth",
                              line=upstream.line or None,
                              expected='"passthrough", "password" or "xoauth2"')
        self.upstream = upstream
        self.verify = verify
        mine = [a for a in accounts if a.upstream == upstream.name and a.sender is None]
        self._by_user = {a.user: a for a in mine if a.user is not None}
        self._default = next((a for a in mine if a.user is None), None)

    def credentials_for(self, user: str) -> UpstreamCredentials:
        """The provider credentials for a relay user (no check of the user's password)."""
        up = self.upstream
        acct = self._by_user.get(user, self._default)
        username = (acct.username if acct else "") or up.username
        if not username:
            raise ConfigError(f"no provider account for relay user {user!r} on upstream "
                              f"{up.name}", key="account", hint="add an [[account]] with "
                              f"upstream = \"{up.name}\", user = \"{user}\" and username = "
                              "the mailbox, or set username on the upstream")
        if up.auth == "xoauth2":
            source = (acct.token_source if acct else None) or up.token_source
            if not source:
                raise ConfigError(f"no token_source for {username} on upstream {up.name}",
                                  key="account.token_source",
                                  hint="set token_source on the [[account]] or the upstream")
            return UpstreamCredentials(username=username, token_source=source)
        password = (acct.password if acct else None) or up.password
        if password is None:
            raise ConfigError(f"no password for {username} on upstream {up.name}",
                              key="account.password",
                              hint="set password (from env or file) on the [[account]] or "
                                   "the upstream")
        return UpstreamCredentials(username=username, password=password)

    async def login(self, user: str, password: Secret) -> UpstreamCredentials | None:
        if not await self.verify(user, password):
            return None
        return self.credentials_for(user)


def build_authenticator(upstream: UpstreamConfig, accounts: Sequence[AccountConfig],
                        verify: Verify | None) -> PassthroughAuthenticator | MappedAuthenticator:
    """The authenticator an upstream's ``auth`` setting calls for."""
    if upstream.auth == "passthrough":
        return PassthroughAuthenticator()
    if verify is None:
        raise ConfigError(f"upstream {upstream.name} maps relay users to a provider account, "
                          "but the listener has no users_file", key="listener.users_file",
                          hint="set users_file on the IMAP/POP3 listener, or use auth = "
                               "\"passthrough\" on the upstream")
    return MappedAuthenticator(upstream=upstream, accounts=accounts, verify=verify)


class _Checks(Protocol):
    def verify_sync(self, name: str, password: bytes) -> bool: ...


def users_file_verify(users: _Checks, *, cache_ttl: float = 60.0) -> Verify:
    """A ``Verify`` over relay's users file (``relay.smtp.auth.UserDB``), off the loop.

    scrypt costs ~0.1 s of CPU; platforms poll their mailboxes every minute, so a
    successful check is remembered for ``cache_ttl`` seconds as a keyed hash of the
    credentials (never the password itself). Failures are never cached.
    """
    key = secrets.token_bytes(32)
    ok: dict[bytes, float] = {}

    async def verify(user: str, password: Secret) -> bool:
        digest = hmac.new(key, user.encode() + b"\0" + password.reveal().encode(),
                          hashlib.sha256).digest()
        now = time.monotonic()
        if ok.get(digest, 0.0) > now:
            return True
        good = await asyncio.to_thread(users.verify_sync, user, password.reveal().encode())
        if good:
            if len(ok) > 10_000:
                for k in [k for k, exp in ok.items() if exp <= now]:
                    del ok[k]
            ok[digest] = now + cache_ttl
        return good

    return verify
