"""`relay check [UPSTREAM ...]`: test every channel of each upstream, like a test button."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from relay.cli.common import add_config_arg, config_path
from relay.config.loader import load_config
from relay.errors import RelayError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "check", help="test the connection to upstreams (proxy, TLS, greeting, AUTH)",
        description="Walk each channel of each upstream (its own credentials and every "
                    "[[account]] mapped to it) through its transport (proxy handshake, TCP, "
                    "TLS, greeting, EHLO/CAPABILITY, AUTH with token fetch), with the login "
                    "code delivery and the IMAP/POP3 proxy run, and explain any failure. "
                    "Each step prints as it ends; a step still waiting says so after 5 s. "
                    "Sends no mail unless --send-test is given. Exits 1 if any channel "
                    "fails.")
    parser.add_argument("upstreams", nargs="*", metavar="UPSTREAM",
                        help="upstream names (default: all)")
    add_config_arg(parser)
    parser.add_argument("--account", metavar="NAME",
                        help="only the [[account]] whose user, sender or mailbox is NAME")
    parser.add_argument("--user", metavar="USER",
                        help="log in as USER (a pass-through or password upstream): the "
                             "credentials the platform will use; the password comes from "
                             "--password-stdin")
    parser.add_argument("--password-stdin", action="store_true",
                        help="read --user's password from the first line of standard input")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="bound the whole walk (default 120); what was still waiting "
                             "is named")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON report at the end, nothing else on stdout")
    parser.add_argument("--send-test", metavar="ADDRESS",
                        help="also send a small test message to ADDRESS (SMTP upstreams; an "
                             "outbox upstream writes it into its folder)")
    parser.add_argument("--from", dest="send_from", metavar="ADDRESS",
                        help="envelope sender of the test message (default: the mailbox)")
    parser.set_defaults(func=check_command)


def _password(args: argparse.Namespace) -> str | None:
    if args.user is None:
        if args.password_stdin:
            raise RelayError("--password-stdin goes with --user",
                             hint="relay check --user NAME --password-stdin tests the login "
                                  "the platform will use")
        return None
    if not args.password_stdin:
        raise RelayError("--user needs --password-stdin",
                         hint=f"printf '%s\\n' \"$PASSWORD\" | relay check UPSTREAM --user "
                              f"{args.user} --password-stdin (never on the command line)")
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise RelayError("no password on standard input", hint="give it as its first line")
    return line


def check_command(args: argparse.Namespace) -> int:
    from relay.config.schema import Secret
    from relay.probe.live import LivePrinter  # the probe loads every transport
    from relay.probe.steps import Report, to_json
    from relay.probe.walk import run_check

    logging.basicConfig(level=logging.ERROR, format="relay: %(message)s")
    password = _password(args)
    config = load_config(config_path(args.config))
    printer = None if args.json else LivePrinter(lambda line: print(line, flush=True))

    async def walk() -> list[Report]:
        ticking = asyncio.ensure_future(printer.ticking()) if printer is not None else None
        try:
            return await run_check(
                config, args.upstreams, send_test=args.send_test, send_from=args.send_from,
                account=args.account, user=args.user,
                password=Secret(password, "standard input") if password is not None else None,
                timeout=args.timeout, begin=printer.begin if printer else None,
                end=printer.end if printer else None)
        finally:
            if ticking is not None:
                ticking.cancel()

    reports = asyncio.run(walk())
    if args.json:
        print(json.dumps(to_json(reports), indent=2))
    return 0 if all(r.ok for r in reports) else 1
