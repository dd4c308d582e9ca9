"""The only reader of argv: relay run, config check, queue, user, dkim, spf, check.

Each area registers its subcommands from its own module (``relay/cli/<area>.py`` with
``register(subparsers)``); a handler takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

from relay import __version__
from relay.config.lookup import ORDER
from relay.errors import RelayError

# Areas, in the order `relay --help` lists them. Each is relay.cli.<area> with register().
AREAS: tuple[str, ...] = ("run", "config", "dkim", "spf", "check", "user", "queue")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="Mail relay proxy for contact centers.",
        epilog=f"Every command finds its config file in this order: {ORDER}. "
               "`relay COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in AREAS:
        import_module(f"relay.cli.{area}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except RelayError as exc:
        print(f"relay: {exc.explain()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
