"""`relay check [UPSTREAM ...]`: test each upstream's path step by step, like a test button."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from relay.cli.common import add_config_arg, config_path
from relay.config.loader import load_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "check", help="test the connection to upstreams (proxy, TLS, greeting, AUTH)",
        description="Walk each upstream through its transport (proxy handshake, TCP, TLS, "
                    "greeting, EHLO/CAPABILITY, AUTH with token fetch) and explain any "
                    "failure. Sends no mail unless --send-test is given. Exits 1 if any "
                    "upstream fails.")
    parser.add_argument("upstreams", nargs="*", metavar="UPSTREAM",
                        help="upstream names (default: all)")
    add_config_arg(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    parser.add_argument("--send-test", metavar="ADDRESS",
                        help="also send a small test message to ADDRESS (SMTP upstreams)")
    parser.add_argument("--from", dest="send_from", metavar="ADDRESS",
                        help="envelope sender of the test message (default: the mailbox)")
    parser.set_defaults(func=check_command)


def check_command(args: argparse.Namespace) -> int:
    from relay.probe.steps import format_text, to_json  # the probe loads every transport
    from relay.probe.walk import run_check

    logging.basicConfig(level=logging.ERROR, format="relay: %(message)s")
    config = load_config(config_path(args.config))
    reports = asyncio.run(run_check(config, args.upstreams, send_test=args.send_test,
                                    send_from=args.send_from))
    if args.json:
        print(json.dumps(to_json(reports), indent=2))
    else:
        print(format_text(reports), end="")
    return 0 if all(r.ok for r in reports) else 1
