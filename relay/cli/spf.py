"""`relay spf check DOMAIN` / `relay spf record SET...`: SPF pre-flight and what to publish.

``check`` asks whether mail from DOMAIN would pass SPF from some addresses (given one by
one or as a named address set such as ``cxone-na1-spf``) or through an upstream's provider.
``record`` prints the ``ip4:``/``ip6:`` fragment that authorises named sets, with the DNS
lookups it adds, and with ``--domain`` the domain's record with the fragment merged in.
"""

from __future__ import annotations

import argparse
import ipaddress

from relay.cli.common import config_path
from relay.cli.dns_args import add_dns_args, resolver_from_args
from relay.config.schema import Network, UpstreamConfig
from relay.config.values import address_typo
from relay.errors import ConfigError, RelayError

MAX_STRING = 255          # one TXT character-string; longer records are split into several
UDP_SAFE = 450            # above this, a TXT answer may not fit a plain UDP DNS reply


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("spf", help="check a sender domain's SPF before sending",
                            description="SPF pre-flight for outbound mail.")
    verbs = parser.add_subparsers(dest="spf_command", metavar="ACTION", required=True)
    check = verbs.add_parser(
        "check", help="does DOMAIN's SPF authorise these addresses or this upstream?",
        description="Look DOMAIN's SPF record up, count its DNS lookups against the limit of "
                    "10, evaluate it for each --ip (an address, or every address of a named "
                    "address set) and check that it includes the provider of --upstream. "
                    "Exit 1 when mail would fail, 2 when DNS failed.")
    check.add_argument("domain", metavar="DOMAIN")
    check.add_argument("--ip", action="append", default=[], metavar="IP|SET",
                       help="an address relay (or its upstream) sends from, or a named address "
                            "set such as cxone-na1-spf; repeatable")
    check.add_argument("--upstream", metavar="NAME",
                       help="an [[upstream]] from the config (its provider's include)")
    add_dns_args(check)
    check.set_defaults(func=check_command)
    record = verbs.add_parser(
        "record", help="the ip4: fragment to publish for named address sets",
        description="Print the ip4:/ip6: terms that authorise every address of the named "
                    "sets (e.g. cxone-na1-spf) and the DNS lookups they add; with --domain, "
                    "the domain's current record with them merged in.")
    record.add_argument("sets", nargs="+", metavar="SET")
    record.add_argument("--domain", metavar="DOMAIN",
                        help="merge into this domain's published record")
    add_dns_args(record)
    record.set_defaults(func=record_command)


def _address_sets(args: argparse.Namespace) -> tuple[dict[str, tuple[Network, ...]], str]:
    """The named sets: the config's (with its own [[address_set]]s), else the shipped file."""
    from relay.config.loader import load_config, read_address_sets, shipped_data

    try:
        path = config_path(args.config)
    except ConfigError:
        raise                                   # a config named by -c or $RELAY_CONFIG is missing
    except RelayError:
        shipped = shipped_data("address_sets.toml")       # no config anywhere: the shipped sets
        return read_address_sets(shipped), str(shipped)
    return load_config(path, secrets=False).address_sets, str(path)


def _named_set(name: str, sets: dict[str, tuple[Network, ...]], where: str,
               option: str) -> tuple[Network, ...]:
    from relay.config.reader import suggest

    if name not in sets:
        what = (f"--ip {name!r} is neither an IP address nor a named address set"
                if option == "--ip" else f"no address set named {name!r}")
        raise RelayError(what, hint=suggest(name, sets) or
                         f"sets in {where}: {', '.join(sorted(sets)) or 'none'}")
    return sets[name]


def _targets(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[str]]:
    """(address, the set it came from or "") for each --ip, and notes for the output."""
    out: list[tuple[str, str]] = []
    notes: list[str] = []
    sets: tuple[dict[str, tuple[Network, ...]], str] | None = None
    for item in args.ip:
        try:
            out.append((str(ipaddress.ip_address(item)), ""))
            continue
        except ValueError:
            pass
        typo = address_typo(item)
        if typo is not None:
            hint = (typo.hint if len(typo.fixed) == 1 else "repeat --ip for each: " +
                    " ".join(f"--ip {f}" for f in typo.fixed))
            raise RelayError(f"--ip {item!r} is not an IP address ({typo.what})", hint=hint)
        if sets is None:
            sets = _address_sets(args)
        for net in _named_set(item, *sets, "--ip"):
            if net.num_addresses == 1:
                out.append((str(net.network_address), item))
            else:
                out += [(str(net[0]), item), (str(net[-1]), item)]
                notes.append(f"{item}: network {net} is checked at its first and last address")
    return out, notes


def check_command(args: argparse.Namespace) -> int:
    from relay.probe.spf import MAX_LOOKUPS, preflight  # pyspf and dnspython: lazily

    targets, notes = _targets(args)
    resolver, config = resolver_from_args(args, need_config=bool(args.upstream))
    upstream: UpstreamConfig | None = None
    if args.upstream:
        assert config is not None
        try:
            upstream = config.upstream(args.upstream)
        except KeyError:
            names = ", ".join(u.name for u in config.upstreams) or "none"
            raise ConfigError(f"no upstream named {args.upstream!r} in {config.source}",
                              hint=f"configured upstreams: {names}") from None
    ips = tuple(dict.fromkeys(ip for ip, _ in targets))
    pf = preflight(resolver, args.domain, ips=ips, upstream=upstream)
    print(f"domain:   {pf.domain}")
    print(f"record:   {pf.record if pf.record is not None else '(none)'}")
    if pf.record is not None:
        over = "  OVER THE LIMIT" if pf.lookups > MAX_LOOKUPS else ""
        print(f"lookups:  {pf.lookups} of {MAX_LOOKUPS}{over}")
    origin = {ip: where for ip, where in targets}
    for ip, r in pf.ips.items():
        label = f" ({origin[ip]})" if origin.get(ip) else ""
        print(f"ip {ip}{label}: spf={r.result}" + (f" ({r.mechanism})" if r.mechanism else ""))
    for note in notes:
        print(f"note:     {note}")
    if pf.include:
        state = "present" if pf.include_found else "MISSING"
        print(f"provider: {pf.provider}: include:{pf.include} {state}")
    for w in pf.warnings:
        print(f"warning:  {w}")
    for p in pf.problems:
        print(f"problem:  {p}")
    if pf.ok:
        print("result:   ok")
        return 0
    print("result:   mail from this domain would fail SPF" if not pf.temporary
          else "result:   could not check (DNS)")
    return 2 if pf.temporary else 1


def fragment(networks: list[Network]) -> str:
    """``ip4:a ip4:b/24 ip6:...`` for the networks, single addresses without ``/32``."""
    terms = []
    for net in dict.fromkeys(networks):
        kind = "ip4" if net.version == 4 else "ip6"
        value = str(net.network_address) if net.num_addresses == 1 else str(net)
        terms.append(f"{kind}:{value}")
    return " ".join(terms)


def merge(record: str, add: str) -> str:
    """``record`` with the terms of ``add`` it lacks put before its ``all``/``redirect=``."""
    terms = record.split()
    have = {t.lower().lstrip("+") for t in terms}
    new = [t for t in add.split() if t.lower() not in have]
    at = next((i for i, t in enumerate(terms) if t.lower().lstrip("+-~?") == "all"
               or t.lower().startswith("redirect=")), len(terms))
    return " ".join(terms[:at] + new + terms[at:])


def record_command(args: argparse.Namespace) -> int:
    from relay.probe.spf import MAX_LOOKUPS, preflight, record_typos

    sets, where = _address_sets(args)
    networks: list[Network] = []
    for name in args.sets:
        nets = _named_set(name, sets, where, "set")
        networks.extend(nets)
        print(f"set:      {name}: {len(nets)} address{'es' if len(nets) != 1 else ''} "
              f"(from {where})")
    frag = fragment(networks)
    print(f"fragment: {frag}")
    print(f"lookups:  +0 (ip4:/ip6: terms need no DNS lookup; the limit is {MAX_LOOKUPS})")
    if not args.domain:
        print(f"publish:  v=spf1 {frag} -all   (or add the fragment to your existing record "
              "before its -all / ~all; --domain DOMAIN does that for you)")
        return 0
    resolver, _config = resolver_from_args(args, need_config=False)
    pf = preflight(resolver, args.domain)
    if pf.temporary:
        for p in pf.problems:
            print(f"problem:  {p}")
        return 2
    current = pf.record
    print(f"current:  {current if current is not None else '(none)'}")
    proposed = merge(current, frag) if current is not None else f"v=spf1 {frag} -all"
    print(f"publish:  {proposed}")
    if current is not None:
        print(f"lookups:  {pf.lookups} of {MAX_LOOKUPS} (unchanged)")
    for p in record_typos(current or ""):
        print(f"problem:  {p}")
    size = len(proposed)
    print(f"length:   {size} characters" +
          (f"; over {MAX_STRING}: publish it as several quoted strings in one TXT record"
           if size > MAX_STRING else ""))
    if size > UDP_SAFE:
        print(f"warning:  over {UDP_SAFE} characters, the answer may not fit a UDP DNS reply; "
              "move addresses into an include: of their own")
    return 0
