"""How `relay queue` prints results for people (the --json form is the dict itself)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from relay.cli.queue import render, render_list, render_show

pytestmark = pytest.mark.fast


def _msg(**over: Any) -> dict[str, Any]:
    now = time.time()
    m: dict[str, Any] = {
        "id": "1K0RQX3XEZND829SP", "size": 2048, "received_at": now - 3700, "age": 3700.0,
        "state": "deferred", "in_flight": False, "held": False,
        "sender": "agent@example.com", "attempts": 2, "next_attempt": now + 600,
        "last_attempt": now - 60, "upstream": "office365", "last_error": "451 busy",
        "recipients": [
            {"address": "a@example.net", "status": "delivered", "attempts": 1,
             "last_reply": "250 2.0.0 OK"},
            {"address": "b@example.net", "status": "pending", "attempts": 2,
             "last_reply": "451 4.7.0 \x1b[2Jgreylisted"}],
        "envelope": {"sender": "agent@example.com", "recipients": ["a@example.net"],
                     "received_at": now - 3700, "client_ip": "10.0.0.5",
                     "client_helo": "pbx\x07", "listener": "platform", "auth_user": "cc1",
                     "smtputf8": True, "body_8bitmime": False, "dsn_of": "", "trusted": True},
        "headers": "Subject: hi \x1b]0;owned\x07\nFrom: agent@example.com",
    }
    m.update(over)
    return m


def test_list_is_a_readable_table() -> None:
    m = _msg()
    text = render_list({"now": time.time(), "count": 1, "size": 2048, "messages": [m],
                        "counts": {"active": 0, "deferred": 1, "held": 0}})
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["QUEUE", "ID", "SIZE", "ARRIVED"]
    assert lines[1].startswith("1K0RQX3XEZND829SP") and "2.0 KB" in lines[1]
    assert "deferred, 2 attempts, next attempt" in lines[1] and "(in 9m5" in lines[1]
    assert "last via office365" in lines[1]
    assert lines[2].strip() == "from <agent@example.com>, 1h01m ago"
    assert lines[3].strip() == "to <a@example.net> delivered: 250 2.0.0 OK"
    assert lines[4].strip() == "to <b@example.net> pending: 451 4.7.0 \\x1b[2Jgreylisted"
    assert lines[-1] == "-- 1 message, 2.0 KB (0 active, 1 deferred, 0 held)"
    assert "\x1b" not in text


def test_waiting_is_said_in_words() -> None:
    wait = "waiting for quota: 10/min of zendesk-exchange-connector for support@example.com" \
           ", next at 14:03:10"
    paused = "paused by provider until 14:05:00 (421 4.7.0 \x1b[2Jtry again later)"
    msgs = [_msg(state="waiting", attempts=0, waiting={"reason": "quota", "text": wait}),
            _msg(state="waiting", waiting={"reason": "paused", "text": paused})]
    text = render_list({"now": time.time(), "count": 2, "size": 4096, "messages": msgs,
                        "counts": {"active": 0, "deferred": 0, "held": 0, "waiting": 2}})
    lines = text.splitlines()
    assert lines[1].endswith(f"  {wait}")
    assert lines[5].endswith("  paused by provider until 14:05:00 (421 4.7.0 \\x1b[2Jtry "
                             "again later), 2 attempts")
    assert lines[-1] == "-- 2 messages, 4.0 KB (0 active, 2 waiting, 0 deferred, 0 held)"


def test_empty_queue() -> None:
    assert render_list({"now": 0, "count": 0, "size": 0, "messages": [],
                        "counts": {}}) == "Mail queue is empty"


def test_show_never_passes_terminal_escapes() -> None:
    text = render_show(_msg(held=True, state="held"))
    assert "\x1b" not in text and "\x07" not in text
    assert "Subject: hi \\x1b]0;owned\\x07" in text
    assert "Client:        10.0.0.5 (helo pbx\\x07) on platform" in text
    assert "State:         held, 2 attempts, not attempted until released" in text
    assert "Flags:         smtputf8, trusted" in text
    assert "  <b@example.net> pending: 451 4.7.0 \\x1b[2Jgreylisted (2 attempts)" in text


def test_command_results() -> None:
    qid = "1K0RQX3XEZND829SP"
    assert render("retry", {"retried": [qid], "skipped_held": 0}) == f"{qid}: due now"
    assert render("retry", {"retried": [qid, qid], "skipped_held": 1}) == \
        "2 messages due now; 1 held (release them to retry)"
    assert render("hold", {"held": qid, "already": True}) == f"{qid}: already held"
    assert render("release", {"released": qid, "already": False}) == f"{qid}: released"
    assert render("delete", {"deleted": qid, "waited_for_attempt": True}) == \
        f"{qid}: deleted (after its delivery attempt in flight ended)"
