"""Which messages a queue command acts on: ids, --all and filters (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from relay.control.select import Selection, address_matches, matches
from relay.errors import ControlError

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(("pattern", "address", "ok"), [
    ("agent@example.com", "Agent@Example.com", True), ("agent@example.com", "x@example.com", False),
    ("@example.com", "agent@example.com", True), ("@example.com", "a@sub.example.com", False),
    ("*@example.*", "agent@example.net", True), ("*@example.*", "agent@other.net", False),
    ("<>", "", True), ("<>", "mailer-daemon@example.com", False), ("agent?@*", "agent7@x", True),
])
def test_address_patterns(pattern: str, address: str, ok: bool) -> None:
    assert address_matches(pattern, address) is ok


ENTRY: dict[str, Any] = {
    "id": "1K0RQX3XEZND829SP", "sender": "agent@example.com", "state": "deferred",
    "upstream": "office365", "age": 7200.0,
    "recipients": [{"address": "done@example.net", "status": "delivered"},
                   {"address": "wait@example.org", "status": "pending"}]}


@pytest.mark.parametrize(("selection", "ok"), [
    (Selection(every=True), True),
    (Selection(ids=("1K0RQX3XEZND829SP",)), True), (Selection(ids=("0" * 17,)), False),
    (Selection(sender="@example.com", state="deferred"), True),
    (Selection(sender="@example.com", state="held"), False),
    (Selection(recipient="@example.org"), True),
    (Selection(recipient="done@example.net"), False),   # delivered already: not waiting
    (Selection(upstream="office365", older_than=3600), True),
    (Selection(upstream="gmail"), False), (Selection(older_than=7200.0), False),
])
def test_filters_combine_with_and(selection: Selection, ok: bool) -> None:
    assert matches(ENTRY, selection) is ok


def test_a_selection_travels_as_request_args() -> None:
    sel = Selection(ids=("1K0RQX3XEZND829SP",), every=True, sender="<>", state="held",
                    older_than=60.0)
    assert Selection.from_args(sel.to_args()) == sel
    assert Selection().empty and not Selection(state="held").empty


@pytest.mark.parametrize("args", [{"ids": "1K0RQX3XEZND829SP"}, {"state": "stuck"},
                                  {"older_than": -1}, {"older_than": True}, {"sender": 5}])
def test_malformed_requests_are_refused(args: dict[str, Any]) -> None:
    with pytest.raises(ControlError) as exc:
        Selection.from_args(args)
    assert exc.value.code == "bad_request"
