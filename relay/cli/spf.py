"""`relay spf check DOMAIN`: would mail from DOMAIN pass SPF from these IPs or this upstream."""

from __future__ import annotations

import argparse
import ipaddress

from relay.cli.dns_args import add_dns_args, resolver_from_args
from relay.config.schema import UpstreamConfig
from relay.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("spf", help="check a sender domain's SPF before sending",
                            description="SPF pre-flight for outbound mail.")
    verbs = parser.add_subparsers(dest="spf_command", metavar="ACTION", required=True)
    check = verbs.add_parser(
        "check", help="does DOMAIN's SPF authorise these addresses or this upstream?",
        description="Look DOMAIN's SPF record up, count its DNS lookups against the limit of "
                    "10, evaluate it for each --ip and check that it includes the provider of "
                    "--upstream. Exit 1 when mail would fail, 2 when DNS failed.")
    check.add_argument("domain", metavar="DOMAIN")
    check.add_argument("--ip", action="append", default=[], metavar="IP",
                       help="an address relay (or its upstream) sends from; repeatable")
    check.add_argument("--upstream", metavar="NAME",
                       help="an [[upstream]] from the config (its provider's include)")
    add_dns_args(check)
    check.set_defaults(func=check_command)


def check_command(args: argparse.Namespace) -> int:
    from relay.probe.spf import MAX_LOOKUPS, preflight  # pyspf and dnspython: lazily

    for ip in args.ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            hint = "write IPv4 addresses dotted, e.g. 69.169.235.170" if "," in ip else ""
            raise ConfigError(f"--ip {ip!r} is not an IP address", hint=hint) from None
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
    pf = preflight(resolver, args.domain, ips=tuple(args.ip), upstream=upstream)
    print(f"domain:   {pf.domain}")
    print(f"record:   {pf.record if pf.record is not None else '(none)'}")
    if pf.record is not None:
        over = "  OVER THE LIMIT" if pf.lookups > MAX_LOOKUPS else ""
        print(f"lookups:  {pf.lookups} of {MAX_LOOKUPS}{over}")
    for ip, r in pf.ips.items():
        print(f"ip {ip}: spf={r.result}" + (f" ({r.mechanism})" if r.mechanism else ""))
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
