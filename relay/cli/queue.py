"""`relay queue list|show|retry|hold|release|delete`: the mail queue, for people and scripts.

While relay runs (it holds the spool lock) the command goes over the control socket, so
the scheduler learns of it at once; otherwise it acts on the spool files directly with
the same ``QueueManager``, holding the spool lock so no relay starts meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.cli.common import CONFIG_HELP, config_path
from relay.control.queue import QueueManager, check_id
from relay.control.select import STATES, Selection
from relay.control.socket import request
from relay.errors import ControlError, RelayError, SpoolError
from relay.spool.store import Spool


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", metavar="FILE",
                       help=f"relay's config, to find the spool; {CONFIG_HELP}")
    where.add_argument("--spool", metavar="DIR", help="the spool directory itself")
    common.add_argument("--socket", metavar="PATH",
                        help="control socket (default: [relay] control_socket or "
                             "<spool>/control.sock)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long to wait for the running relay (default 300)")
    filters = argparse.ArgumentParser(add_help=False)
    group = filters.add_argument_group(
        "filters", "Narrow the messages (with IDs or --all, or alone); they combine with AND. "
                   "Addresses: an address, @domain, a pattern such as '*@example.*', or '<>' "
                   "for the null sender of bounces.")
    group.add_argument("--from", dest="sender", metavar="ADDRESS", help="the sender")
    group.add_argument("--to", dest="recipient", metavar="ADDRESS",
                       help="a recipient not yet delivered")
    group.add_argument("--upstream", metavar="NAME",
                       help="the upstream of the message's last delivery attempt")
    group.add_argument("--state", choices=STATES, help="active, deferred or held")
    group.add_argument("--older-than", dest="older_than", metavar="DURATION", type=_duration,
                       help='arrived longer ago than this, e.g. "30m", "2h", "3d"')

    parser = sub.add_parser("queue", help="list and steer queued mail",
                            description="Inspect and steer the mail queue, whether or not "
                                        "relay is running.")
    verbs = parser.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    verbs.add_parser("list", parents=[common, filters],
                     help="every queued message (or those the filters name), oldest first")
    verbs.add_parser("show", parents=[common],
                     help="envelope, state, recipients and header of one message"
                     ).add_argument("id", metavar="ID")
    for name, text in (("hold", "keep messages queued but stop delivering them"),
                       ("release", "let held messages be delivered again"),
                       ("delete", "remove messages without delivering them"),
                       ("retry", "attempt delivery now, past a provider's pause and relay's wait "
                                 "after a connection failure (never past a quota; held "
                                 "messages are skipped)")):
        p = verbs.add_parser(
            name, parents=[common, filters], help=text,
            description=f"{text[0].upper()}{text[1:]}: one or more IDs, --all, or the "
                        "messages the filters name. With more than one message it prints "
                        "them first" + ("; deleting more than one asks for confirmation "
                                        "(at a terminal) or --yes." if name == "delete"
                                        else "."))
        p.add_argument("ids", metavar="ID", nargs="*", help="queue ids")
        p.add_argument("--all", action="store_true",
                       help="every queued message (narrowed by any filter)")
        if name == "delete":
            p.add_argument("-y", "--yes", action="store_true",
                           help="delete more than one message without asking")
    parser.set_defaults(func=queue_command)


def _duration(text: str) -> float:
    from relay.config.values import BadValue, parse_duration

    try:
        return parse_duration(text)
    except BadValue as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is {exc.what}: {exc.expected}") from None


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(ids=tuple(check_id(i) for i in getattr(args, "ids", ())),
                     every=bool(getattr(args, "all", False)), sender=args.sender,
                     recipient=args.recipient, upstream=args.upstream, state=args.state,
                     older_than=args.older_than)


def queue_command(args: argparse.Namespace) -> int:
    command: str = args.queue_command
    root, sock = _locate(args)

    def run(name: str, cmd_args: dict[str, Any]) -> dict[str, Any]:
        return asyncio.run(execute(root, sock, name, cmd_args, timeout=args.timeout))

    if command in ("list", "show"):
        cmd_args = _selection(args).to_args() if command == "list" else {"id": check_id(args.id)}
        result = run(command, cmd_args)
        print(json.dumps(result, indent=2, ensure_ascii=False) if args.json
              else render(command, result))
        return 0
    sel = _selection(args)
    if sel.empty:
        raise RelayError(f"relay queue {command}: which messages?",
                         hint="give one or more queue ids, --all, or a filter (--from, --to, "
                              "--upstream, --state, --older-than)")
    if len(sel.ids) == 1 and not sel.every and not sel.filtered:
        result = run(command, {"id": sel.ids[0]})           # one message, as named
        print(json.dumps(result, indent=2, ensure_ascii=False) if args.json
              else render(command, result))
        return 0
    return _many(args, command, sel, run)


def _many(args: argparse.Namespace, command: str, sel: Selection,
          run: Callable[[str, dict[str, Any]], dict[str, Any]]) -> int:
    """Several messages: say which, confirm a delete of more than one, act, sum up."""
    chosen = run("select", sel.to_args())["messages"]
    ids = [m["id"] for m in chosen]
    absent = [i for i in sel.ids if i not in ids]
    if not args.json:
        print(render_plan(command, chosen, absent))
    if len(ids) > 1 and command == "delete" and not args.yes and not _confirmed(len(ids)):
        print(f"relay: nothing deleted: deleting {len(ids)} messages needs confirmation",
              file=sys.stderr)
        print("  hint: run it again with --yes, or from a terminal to be asked",
              file=sys.stderr)
        return 1
    empty: dict[str, Any] = {"command": command, "done": [], "already": [], "missing": [],
                             "held": []}
    result = run(command, {"ids": ids}) if ids else empty
    result["missing"] = [*result["missing"], *absent]
    if args.json:
        print(json.dumps({"selected": chosen, "result": result}, indent=2,
                         ensure_ascii=False))
    else:
        print(render_batch(result))
    return 1 if absent else 0


def _confirmed(count: int) -> bool:
    if not sys.stdin.isatty():
        return False
    sys.stderr.write(f"Delete these {count} messages? [y/N] ")   # not into a stdout pipe
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _locate(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.spool:
        root = Path(args.spool)
        sock = Path(args.socket) if args.socket else root / "control.sock"
        return root, sock
    from relay.config.loader import load_relay_section
    from relay.control.paths import control_path

    relay = load_relay_section(config_path(args.config))    # no secrets needed here
    return relay.spool, Path(args.socket) if args.socket else control_path(relay)


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


_DONE = {"retry": "due now", "hold": "held", "release": "released", "delete": "deleted"}


def render_plan(command: str, chosen: list[dict[str, Any]], absent: list[str]) -> str:
    """What a command is about to do: one line per message."""
    n = len(chosen)
    if not chosen:
        out = [f"{command}: no queued message matches"]
    else:
        out = [f"{command} {n} message{'s' if n != 1 else ''}:"]
        out += [f"  {m['id']}  {m['state']:<8}  from <{_clean(m['sender'])}>  "
                f"{_span(m['age'])} old  to " + ", ".join(
                    f"<{_clean(r['address'])}>" for r in m["recipients"]
                    if r["status"] == "pending") for m in chosen]
    out += [f"  {i}  not in the queue" for i in absent]
    return "\n".join(out)


def render_batch(result: dict[str, Any]) -> str:
    """What became of each message: done, already so, held (retry), gone meanwhile."""
    command = result["command"]
    done, already = len(result["done"]), len(result["already"])
    parts = [f"{done} message{'s' if done != 1 else ''} {_DONE[command]}"]
    if already:
        parts.append(f"{already} already {_DONE[command]}")
    if result["held"]:
        parts.append(f"{len(result['held'])} held (release them to retry)")
    if result["missing"]:
        parts.append(f"{len(result['missing'])} not in the queue (delivered, bounced or "
                     "deleted meanwhile)")
    return "; ".join(parts)


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
