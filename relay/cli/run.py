"""``relay run``, ``relay reload`` and ``relay status``: the daemon and its remote control."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from relay.app.allocator import tune_allocator
from relay.app.collector import pace_collector
from relay.app.eventloop import run as run_loop
from relay.app.logs import setup_logging
from relay.cli.common import add_config_arg, config_path
from relay.config.loader import load_config, load_relay_section
from relay.config.schema import RelaySection
from relay.errors import ConfigError, ControlError, RelayError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, func, text in (
            ("run", _run, "run the relay (foreground; SIGHUP reloads, SIGTERM drains)"),
            ("reload", _reload, "make the running relay re-read its config"),
            ("status", _status, "show whether relay runs, its listeners and queue")):
        p = sub.add_parser(name, help=text, description=text)
        add_config_arg(p)
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)


def _run(args: argparse.Namespace) -> int:
    from relay.app.runtime import App

    path = Path(config_path(args.config))
    config = load_config(path)
    setup_logging(config.relay.log_level)
    pace_collector()
    tune_allocator()
    try:
        return run_loop(App(path, config).run(), config.relay.event_loop)
    except RelayError as exc:
        logging.getLogger("relay").error("cannot start: %s", exc.explain())
        return 1
    except asyncio.CancelledError:
        return 1


def _control(relay: RelaySection, command: str) -> dict[str, Any]:
    from relay.control.paths import control_path
    from relay.control.socket import request

    return asyncio.run(request(control_path(relay), command, timeout=120))


def _reload(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    try:
        # Checked here first (without secrets: those live in relay's own environment and
        # files), so a broken file never reaches the running relay, which checks it again
        # with its secrets and answers with what it found.
        config = load_config(path, secrets=False)
    except ConfigError as exc:
        print(f"relay: {exc.explain()}\nrelay: not reloaded; the running relay keeps its "
              "current config. Fix the file and run `relay reload` again.", file=sys.stderr)
        return 1
    try:
        reply = _control(config.relay, "reload")
    except ControlError as exc:
        if not isinstance(exc.__cause__, OSError):    # it answered, or timed out: no signal
            raise
        return _reload_by_signal(config.relay, exc)
    print(f"relay: {reply.get('message', reply)}")
    return 0 if reply.get("ok") else 1


def _reload_by_signal(relay: RelaySection, exc: ControlError) -> int:
    """No answer on the control socket: SIGHUP, but only to the relay holding the lock."""
    from relay.control.hup import send_sighup

    found = send_sighup(relay)
    if found.pid is None:
        print(f"relay: {exc}\nrelay: not reloaded: {found.why}.\n  hint: start relay "
              "(systemctl start relay, or relay run -c FILE); if it runs, check that this "
              "config names its [relay] spool and control_socket", file=sys.stderr)
        return 1
    print(f"relay: the control socket did not answer ({exc}); sent SIGHUP to relay pid "
          f"{found.pid} ({found.why}); the result is in relay's log")
    return 0


def _status(args: argparse.Namespace) -> int:
    reply = _control(load_relay_section(config_path(args.config)), "status")
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 0
    queue = reply.get("queue", {})
    counts = ", ".join(f"{k} {v}" for k, v in sorted(queue.get("counts", {}).items()))
    print(f"relay pid {reply.get('pid')} {'ready' if reply.get('ready') else 'NOT ready'}; "
          f"config {reply.get('config')}")
    print(f"listeners: {', '.join(reply.get('listeners', []))}")
    pids = ", ".join(str(p) for p in reply.get("listener_processes", []))
    print(f"SMTP listener processes: {pids or 'none (SMTP runs in the main process)'}")
    print(f"queue: {counts or 'empty'}")
    return 0
