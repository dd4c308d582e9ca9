"""`relay config check|show [FILE]`: validate a config, or print its effective values."""

from __future__ import annotations

import argparse
import logging
import sys

from relay.cli.common import CONFIG_HELP, config_path
from relay.config.loader import load_config
from relay.config.schema import Config
from relay.config.show import render
from relay.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("config", help="check or show a config file",
                            description="Validate a config file or print its effective values.")
    verbs = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = verbs.add_parser("check", help="validate FILE; exit 1 with FILE:LINE on a mistake")
    show = verbs.add_parser("show", help="print the effective config, secrets masked")
    for p in (check, show):
        p.add_argument("file", nargs="?", metavar="FILE", help=CONFIG_HELP)
        p.add_argument("-c", "--config", dest="config_opt", metavar="FILE",
                       help="config file (same as FILE)")
    check.set_defaults(func=check_command)
    show.set_defaults(func=show_command)


def _path(args: argparse.Namespace) -> str:
    return str(config_path(args.file or args.config_opt or getattr(args, "config", None)))


class _Warnings(logging.Handler):
    """Collects the loader's warnings so `check` can print them under its verdict."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _load(path: str) -> tuple[Config | None, list[str]]:
    handler = _Warnings()
    logger = logging.getLogger("relay.config")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        return load_config(path), handler.lines
    except ConfigError as exc:
        print(exc.explain(), file=sys.stderr)
        return None, handler.lines
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def summary(config: Config) -> str:
    counts: list[tuple[int, str, str]] = [
        (len(config.listeners), "listener", "listeners"),
        (len(config.upstreams), "upstream", "upstreams"),
        (len(config.routes), "route", "routes"),
        (len(config.proxies), "proxy", "proxies"),
        (len(config.dkim), "DKIM key", "DKIM keys"),
        (len(config.token_sources), "token source", "token sources"),
        (len(config.accounts), "account", "accounts"),
        (len(config.profiles), "profile", "profiles"),
        (len(config.address_sets), "address set", "address sets"),
    ]
    return ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts)


def _check_dkim_keys(path: str, config: Config) -> bool:
    """Load the DKIM keys the way start-up does (relay.dkim.keys), so check sees bad keys."""
    from relay.dkim.keys import load_keys

    try:
        load_keys(config.dkim)
    except ConfigError as exc:
        index = next((i for i, d in enumerate(config.dkim) if d.line == exc.line), None)
        key = f"dkim[{index}].key_file" if index is not None else exc.key
        print(ConfigError(exc.detail, file=exc.file or path, line=exc.line, key=key,
                          got=exc.got, expected=exc.expected, hint=exc.hint).explain(),
              file=sys.stderr)
        return False
    return True


def check_command(args: argparse.Namespace) -> int:
    path = _path(args)
    config, warnings = _load(path)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if config is None or not _check_dkim_keys(path, config):
        return 1
    print(f"{path}: ok ({summary(config)})")
    return 0


def show_command(args: argparse.Namespace) -> int:
    config, warnings = _load(_path(args))
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if config is None:
        return 1
    sys.stdout.write(render(config))
    return 0
