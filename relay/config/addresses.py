"""Named address sets (``cxone-na1`` ...) and allow-lists mixing CIDRs with set names.

Sets come from data files (the shipped ``relay/data/address_sets.toml``) and from the config's
own ``[[address_set]]`` entries, which replace a shipped set of the same name. Both use
the same shape::

    [[address_set]]
    name = "cxone-na1"
    description = "NICE CXone NA1 system mail senders"
    networks = ["207.166.95.11", "54.240.86.0/24"]
"""

from __future__ import annotations

import ipaddress

from relay.config.reader import Table, show, suggest
from relay.config.schema import Network
from relay.config.values import BadValue, comma_typo, is_name, parse_network

AddressSets = dict[str, tuple[Network, ...]]

NETWORK_EXPECTED = 'a CIDR such as "10.20.0.0/16", an address, or a named address set'


def read_sets(tables: list[Table], into: AddressSets, *, shipped: frozenset[str]) -> None:
    """Add each ``[[address_set]]`` table to ``into``; duplicates within a file are errors."""
    seen: set[str] = set()
    for t in tables:
        name = t.text("name", required=True, expected="a set name such as \"office-hq\"",
                     check=is_name)
        if name in seen:
            raise t.error("name", "duplicate address set name", got=show(name),
                          expected="a name used once per file")
        if ":" in name or "/" in name or comma_typo(name) or _is_ip(name):
            raise t.error("name", "set names must not look like addresses", got=show(name))
        seen.add(name)
        t.text("description")
        raw = t.raw.get("networks")
        t.known.add("networks")
        if not isinstance(raw, list) or not raw:
            raise t.error("networks", "missing or empty" if raw in (None, []) else "wrong type",
                          got=None if raw is None else show(raw),
                          expected="a non-empty array of CIDRs or addresses")
        nets: list[Network] = []
        for i, item in enumerate(raw):
            nets.append(_one_network(t, "networks", i, item, sets=None))
        t.finish()
        if name in into and name in shipped:
            t.warn("name", f'replaces the shipped address set "{name}"')
        into[name] = tuple(nets)


def expand(table: Table, key: str, sets: AddressSets, *, sets_hint: str) -> tuple[Network, ...]:
    """An allow-list: each item a CIDR, an address or a set name, expanded in order."""
    table.known.add(key)
    raw = table.raw.get(key)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise table.error(key, "wrong type", got=show(raw),
                          expected="an array of CIDRs, addresses or set names")
    out: list[Network] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and is_name(item) and not _addressish(item):
            if item not in sets:
                hint = suggest(item, sets) or sets_hint
                raise table.ctx.error((*table.path, key, i), "unknown address set",
                                      got=show(item), expected=NETWORK_EXPECTED, hint=hint)
            out.extend(sets[item])
        else:
            out.append(_one_network(table, key, i, item, sets=sets))
    return tuple(dict.fromkeys(out))


def _one_network(table: Table, key: str, i: int, item: object,
                 sets: AddressSets | None) -> Network:
    path = (*table.path, key, i)
    if not isinstance(item, str):
        raise table.ctx.error(path, "wrong type", got=show(item),
                              expected="a string such as \"10.20.0.0/16\"")
    try:
        return parse_network(item)
    except BadValue as exc:
        hint = exc.hint
        if sets is None and is_name(item) and not _addressish(item):
            hint = "address sets cannot include other sets; list the networks"
        raise table.ctx.error(path, exc.what, got=show(item), expected=exc.expected,
                              hint=hint) from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _addressish(text: str) -> bool:
    """Digits and dots/commas only (``10.0.0.1``, ``69,169,235,170``): meant as an address."""
    return bool(text) and all(c.isdigit() or c in ".,/:" for c in text)
