"""What a reload changed: the upstreams whose way to the provider is not the same any more.

An upstream changed when its address (host, port), TLS (mode, CA, verification, server
name), credentials (auth, username, password, token source, the token source's own
entry, the ``[[account]]`` entries for it) or its tunnel (``via``, or the ``[[proxy]]``
entry it goes through) differ between the old and the new config. Limits, timeouts and
profiles are not part of it: they apply to the next attempt anyway.
"""

from __future__ import annotations

import dataclasses

from relay.config.schema import Config, UpstreamConfig

_WAY = ("protocol", "host", "port", "tls", "ca_file", "verify_tls", "tls_server_name", "auth",
        "username", "password", "token_source", "via", "path")


def _way(config: Config, up: UpstreamConfig) -> tuple[object, ...]:
    accounts = tuple(a for a in config.accounts if a.upstream == up.name)
    sources = {up.token_source, *(a.token_source for a in accounts)} - {None}
    tokens = tuple(t for t in config.token_sources if t.name in sources)
    proxy = next((p for p in config.proxies if p.name == up.via), None)
    token_proxies = tuple(p for p in config.proxies if p.name in {t.via for t in tokens})
    return (tuple(getattr(up, k) for k in _WAY), _strip(accounts), _strip(tokens),
            _strip((proxy,) if proxy else ()), _strip(token_proxies))


def _strip(entries: tuple[object, ...]) -> tuple[object, ...]:
    """Entries without their line numbers (moving an entry in the file changes nothing)."""
    return tuple(dataclasses.replace(e, line=0) if dataclasses.is_dataclass(e)
                 and not isinstance(e, type) else e for e in entries)


def changed_upstreams(old: Config, new: Config) -> list[str]:
    """Names of the upstreams of ``new`` whose way to the provider differs from ``old``."""
    before = {u.name: u for u in old.upstreams}
    return [u.name for u in new.upstreams
            if u.name in before and _way(old, before[u.name]) != _way(new, u)]
