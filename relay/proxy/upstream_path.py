"""What a proxy session's way to its provider is made of, to tell when a reload changed it.

A session logged in through one upstream config, one proxy or SSH bastion and one set of
credentials (the upstream's, its accounts', their token sources). ``UpstreamPath`` is that,
with line numbers left out (an edit elsewhere in the file changes nothing) and key files
stamped (a new key in the same file is a change). Two equal paths mean open sessions are
still on the current way; otherwise ``changes`` says in words what is different.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.schema import (
    AccountConfig,
    Config,
    ProxyConfig,
    TokenSourceConfig,
    UpstreamConfig,
)
from relay.transports.factory import FileStamp, proxy_identity, without_line


@dataclass(frozen=True, slots=True)
class UpstreamPath:
    upstream: UpstreamConfig
    proxy: tuple[ProxyConfig, FileStamp, FileStamp] | None
    accounts: tuple[AccountConfig, ...]
    token_sources: tuple[TokenSourceConfig, ...]

    def changes(self, new: UpstreamPath) -> str:
        """What differs, for the log: "proxy dante-a → dante-b", "credentials", ..."""
        old_up, new_up = self.upstream, new.upstream
        said: list[str] = []
        if old_up.name != new_up.name:
            said.append(f"upstream {old_up.name} → {new_up.name}")
        elif (old_up.host, old_up.port, old_up.tls) != (new_up.host, new_up.port, new_up.tls):
            said.append("host, port or TLS mode")
        if old_up.via != new_up.via:
            said.append(f"proxy {old_up.via or 'none (direct)'} → {new_up.via or 'none (direct)'}")
        elif self.proxy != new.proxy:
            said.append(f"the settings of proxy {new_up.via}")
        creds = ("username", "password", "token_source", "auth")
        if any(getattr(old_up, k) != getattr(new_up, k) for k in creds) or \
                self.accounts != new.accounts or self.token_sources != new.token_sources:
            said.append("credentials")
        return ", ".join(said) or "TLS or connection settings"


def upstream_path(config: Config, upstream: str) -> UpstreamPath:
    """The way sessions to ``upstream`` take under ``config``."""
    up = config.upstream(upstream)
    proxy = proxy_identity(config.proxy(up.via)) if up.via is not None else None
    accounts = tuple(without_line(a) for a in config.accounts if a.upstream == up.name)
    names = {up.token_source, *(a.token_source for a in accounts)} - {None}
    sources = tuple(without_line(t) for t in config.token_sources if t.name in names)
    return UpstreamPath(without_line(up), proxy, accounts, sources)
