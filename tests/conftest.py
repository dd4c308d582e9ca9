"""Suite-wide hooks: keep the fast lane honest.

The fast lane is a run that selects only tests marked ``fast`` (``pytest -m fast``, as
``scripts/test --fast`` runs it, or a file of fast tests). In it, a fast test that starts
a peer, the relay, any other program or opens a socket fails at once, naming what it
started, instead of quietly needing Debian packages or root. ``tests/peers`` asks before
each peer it starts; the patches below catch everything else.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.peers import fast_lane, refuse_in_fast_lane

FAST_LANE = pytest.StashKey[bool]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """The fast lane is on when every selected test is marked fast (``-m fast``)."""
    items = session.items
    session.config.stash[FAST_LANE] = bool(items) and all(
        item.get_closest_marker("fast") for item in items)


def describe(args: Any) -> str:
    """The program an argv starts, as a reader knows it (``python -m relay run``)."""
    argv = [os.fspath(a) for a in ([args] if isinstance(args, str | bytes | os.PathLike)
                                   else args)]
    argv = [a.decode() if isinstance(a, bytes) else a for a in argv]
    if argv and (argv[0] == sys.executable or os.path.basename(argv[0]).startswith("python")):
        words = [a for a in argv[1:] if a != "-P"][:3]
        if words[:2] == ["-m", "relay"]:
            return f"relay (python {' '.join(words)})"
        return f"python {' '.join(words)}"
    return os.path.basename(argv[0]) if argv else "a program"


@contextlib.contextmanager
def no_programs_or_sockets() -> Iterator[None]:
    """Turn starting a program or binding/connecting a socket into a fast-lane failure."""
    execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def refuse_child(self: subprocess.Popen[Any], args: Any, *rest: Any) -> None:
        refuse_in_fast_lane(describe(args))
        execute_child(self, args, *rest)

    def refuse_socket(verb: str) -> Any:
        real = getattr(socket.socket, verb)

        def call(self: socket.socket, address: Any, *rest: Any) -> Any:
            refuse_in_fast_lane(f"a socket ({verb} {address!r})", verb="opens")
            return real(self, address, *rest)
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "_execute_child", refuse_child)
        for verb in ("bind", "connect", "connect_ex"):
            mp.setattr(socket.socket, verb, refuse_socket(verb))
        yield


@contextlib.contextmanager
def guarded(item: pytest.Item) -> Iterator[None]:
    if item.config.stash.get(FAST_LANE, False) and item.get_closest_marker("fast"):
        with fast_lane(item.nodeid), no_programs_or_sockets():
            yield
    else:
        yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Leave no system account behind: the one Dante's tests made in this process goes."""
    from tests.peers.dante import remove_account

    remove_account()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with guarded(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with guarded(item):
        return (yield)
