"""`relay queue list|show|retry|hold|release|delete`: the mail queue, for people and scripts.

While relay runs (it holds the spool lock) the command goes over the control socket, so
the scheduler learns of it at once; otherwise it acts on the spool files directly with
the same ``QueueManager``, holding the spool lock so no relay starts meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from relay.cli.common import DEFAULT_CONFIG
from relay.control.queue import QueueManager, check_id
from relay.control.socket import request
from relay.errors import ControlError, SpoolError
from relay.spool.store import Spool


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", metavar="FILE",
                       help=f"relay's config, to find the spool (default {DEFAULT_CONFIG})")
    where.add_argument("--spool", metavar="DIR", help="the spool directory itself")
    common.add_argument("--socket", metavar="PATH",
                        help="control socket (default: [relay] control_socket or "
                             "<spool>/control.sock)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long to wait for the running relay (default 300)")

    parser = sub.add_parser("queue", help="list and steer queued mail",
                            description="Inspect and steer the mail queue, whether or not "
                                        "relay is running.")
    verbs = parser.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    verbs.add_parser("list", parents=[common], help="every queued message, oldest first")
    for name, text in (("show", "envelope, state, recipients and header of one message"),
                       ("hold", "keep a message queued but stop delivering it"),
                       ("release", "let a held message be delivered again"),
                       ("delete", "remove a message without delivering it")):
        verbs.add_parser(name, parents=[common], help=text).add_argument("id", metavar="ID")
    retry = verbs.add_parser("retry", parents=[common], help="attempt delivery now",
                             description="Attempt delivery now, past a provider's pause and "
                                         "relay's wait after a connection failure (never "
                                         "past a quota).")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", metavar="ID", nargs="*", default=[],
                       help="the message(s) to retry")
    which.add_argument("--all", action="store_true", help="every message that is not held")
    parser.set_defaults(func=queue_command)


def queue_command(args: argparse.Namespace) -> int:
    command: str = args.queue_command
    cmd_args: dict[str, Any] = {}
    if getattr(args, "all", False):
        cmd_args["all"] = True
    elif command == "retry" and len(args.id) > 1:
        cmd_args["ids"] = [check_id(i) for i in args.id]
    elif command == "retry":
        if not args.id:
            raise ControlError("which messages?", code="bad_request",
                               hint="relay queue retry ID [ID ...] or relay queue retry --all")
        cmd_args["id"] = check_id(args.id[0])
    elif command != "list":
        cmd_args["id"] = check_id(args.id)
    root, sock = _locate(args)
    result = asyncio.run(execute(root, sock, command, cmd_args, timeout=args.timeout))
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(render(command, result))
    return 0


def _locate(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.spool:
        root = Path(args.spool)
        sock = Path(args.socket) if args.socket else root / "control.sock"
        return root, sock
    from relay.config.loader import load_config

    config = load_config(args.config or DEFAULT_CONFIG)
    root = config.relay.spool
    sock = config.relay.control_socket or root / "control.sock"
    return root, Path(args.socket) if args.socket else sock


async def execute(root: Path, sock: Path, command: str, cmd_args: dict[str, Any], *,
                  timeout: float = 300.0) -> dict[str, Any]:
    """Run one queue command through the running relay, or on the files if none runs."""
    if not (root / "queue").is_dir():
        raise ControlError(f"{root} is not a relay spool (it has no queue/ directory)",
                           code="not_found",
                           hint="pass --spool DIR or -c CONFIG naming relay's spool; the "
                                "spool is created when relay first starts")
    spool = Spool(root)
    if spool.is_locked_by_other():
        return await request(sock, command, timeout=timeout, **cmd_args)
    try:
        spool.lock()
    except SpoolError:                          # a relay started just now
        return await request(sock, command, timeout=timeout, **cmd_args)
    try:
        await asyncio.to_thread(spool.scan)
        return await QueueManager(spool).handle(command, cmd_args)
    finally:
        spool.close()


# --- rendering for people --------------------------------------------------------------------

def _clean(text: str) -> str:
    """Text from the network made safe for a terminal (no escape sequences)."""
    return "".join(c if c.isprintable() or c == "\t" else f"\\x{ord(c):02x}" for c in text)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _span(seconds: float) -> str:
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def _state_line(m: dict[str, Any], now: float) -> str:
    waiting = m.get("waiting")
    if waiting and not m["in_flight"]:       # "waiting for quota: 10/min of ..., next at"
        parts = [_clean(waiting["text"])]
        if m["attempts"]:
            parts.append(f"{m['attempts']} attempt{'s' if m['attempts'] != 1 else ''}")
        return ", ".join(parts)
    parts = [m["state"] + (" (attempt in flight)" if m["in_flight"] else "")]
    if m["attempts"]:
        parts.append(f"{m['attempts']} attempt{'s' if m['attempts'] != 1 else ''}")
    if m["held"]:
        parts.append("not attempted until released")
    elif m["next_attempt"] > now and not m["in_flight"]:
        parts.append(f"next attempt {_when(m['next_attempt'])} "
                     f"(in {_span(m['next_attempt'] - now)})")
    if m["upstream"]:
        parts.append(f"last via {m['upstream']}")
    return ", ".join(parts)


def _rcpt_line(r: dict[str, Any]) -> str:
    line = f"<{_clean(r['address'])}> {r['status']}"
    if r["last_reply"]:
        line += f": {_clean(r['last_reply'])}"
    return line


def render_list(result: dict[str, Any]) -> str:
    msgs = result["messages"]
    if not msgs:
        return "Mail queue is empty"
    now = result["now"]
    out = [f"{'QUEUE ID':<17}  {'SIZE':>9}  {'ARRIVED':<19}  STATE / SENDER / RECIPIENTS"]
    for m in msgs:
        out.append(f"{m['id']:<17}  {_size(m['size']):>9}  {_when(m['received_at'])}  "
                   f"{_state_line(m, now)}")
        out.append(f"{'':>50}from <{_clean(m['sender'])}>, {_span(m['age'])} ago")
        for r in m["recipients"]:
            out.append(f"{'':>50}to {_rcpt_line(r)}")
    c = result["counts"]
    waiting = f", {c['waiting']} waiting" if c.get("waiting") else ""
    out.append(f"-- {result['count']} message{'s' if result['count'] != 1 else ''}, "
               f"{_size(result['size'])} ({c['active']} active{waiting}, "
               f"{c['deferred']} deferred, {c['held']} held)")
    return "\n".join(out)


def render_show(m: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    env = m["envelope"]
    client = env["client_ip"] or "local"
    if env["client_helo"]:
        client += f" (helo {_clean(env['client_helo'])})"
    rows = [("Queue ID", m["id"]), ("State", _state_line(m, now)),
            ("Size", f"{m['size']} bytes"),
            ("Received", f"{_when(m['received_at'])} ({_span(m['age'])} ago)"),
            ("Client", client + (f" on {env['listener']}" if env["listener"] else "")),
            ("Sender", f"<{_clean(m['sender'])}>")]
    if env["auth_user"]:
        rows.append(("Auth user", _clean(env["auth_user"])))
    flags = [f for f in ("smtputf8", "body_8bitmime", "trusted") if env.get(f)]
    if env["dsn_of"]:
        flags.append(f"bounce report for {env['dsn_of']}")
    if flags:
        rows.append(("Flags", ", ".join(flags)))
    if m["last_attempt"]:
        rows.append(("Last attempt", _when(m["last_attempt"])))
    if m["last_error"]:
        rows.append(("Last error", _clean(m["last_error"])))
    out = [f"{k + ':':<14} {v}" for k, v in rows]
    out.append("Recipients:")
    out += [f"  {_rcpt_line(r)} ({r['attempts']} attempt{'s' if r['attempts'] != 1 else ''})"
            for r in m["recipients"]]
    out.append("Header:")
    out += [f"  {_clean(line)}" for line in m["headers"].split("\n")]
    return "\n".join(out)


def render(command: str, result: dict[str, Any]) -> str:
    if command == "list":
        return render_list(result)
    if command == "show":
        return render_show(result)
    if command == "retry":
        ids = result["retried"]
        text = (f"{ids[0]}: due now" if len(ids) == 1 and not result["skipped_held"]
                else f"{len(ids)} message{'s' if len(ids) != 1 else ''} due now")
        if result["skipped_held"]:
            text += f"; {result['skipped_held']} held (release them to retry)"
        return text
    if command == "delete":
        extra = " (after its delivery attempt in flight ended)" \
            if result["waited_for_attempt"] else ""
        return f"{result['deleted']}: deleted{extra}"
    key = "held" if command == "hold" else "released"
    return f"{result[key]}: {'already ' if result['already'] else ''}{key}"
