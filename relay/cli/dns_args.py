"""Shared `--dns` / `-c` options of the dkim and spf commands: which resolver to ask."""

from __future__ import annotations

import argparse

from relay.cli.common import CONFIG_HELP, config_path
from relay.config.schema import Config, HostPort
from relay.dns import Resolver
from relay.errors import ConfigError


def add_dns_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="its [relay] dns_servers and dns_timeout are used; "
                             + CONFIG_HELP)
    parser.add_argument("--dns", action="append", default=[], metavar="HOST:PORT",
                        help="ask this DNS server instead (repeatable)")
    parser.add_argument("--dns-timeout", type=float, default=None, metavar="SECONDS")


def parse_hostport(text: str) -> HostPort:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "53"
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--dns {text!r} is not HOST:PORT", hint="e.g. --dns 127.0.0.1:53")
    return HostPort(host, int(port))


def resolver_from_args(args: argparse.Namespace, *,
                       need_config: bool) -> tuple[Resolver, Config | None]:
    """The resolver the command should use, and the config when one was asked for/needed."""
    config = None
    if need_config or args.config:
        from relay.config.loader import load_config

        config = load_config(config_path(args.config), secrets=False)
    servers = tuple(parse_hostport(s) for s in args.dns)
    timeout = args.dns_timeout
    if config is not None:
        servers = servers or config.relay.dns_servers
        timeout = timeout if timeout is not None else config.relay.dns_timeout
    return Resolver(servers=servers, timeout=timeout if timeout is not None else 5.0), config
