"""The main process's counts for a listener several listener processes serve."""

from __future__ import annotations

import asyncio

import pytest

from relay.config.schema import HostPort, ListenerConfig
from relay.connlimits import TOO_MANY, TOO_MANY_FROM_CLIENT, Limits
from relay.listenproc.anvil import LATE_GRACE, Anvil, NetworkFailures
from relay.listenproc.supervisor import ListenerProcesses, _Slot
from relay.metrics import Metrics

pytestmark = pytest.mark.fast

LIMITS = Limits(total=4, per_client=2)


def test_one_count_for_every_process() -> None:
    anvil = Anvil()
    assert anvil.admit(101, (1, "submit", "10.0.0.1", LIMITS)) is None
    assert anvil.admit(102, (1, "submit", "10.0.0.1", LIMITS)) is None     # other process
    assert anvil.admit(101, (2, "submit", "10.0.0.1", LIMITS)) == TOO_MANY_FROM_CLIENT
    assert anvil.admit(102, (2, "submit", "10.0.0.2", LIMITS)) is None
    assert anvil.admit(101, (3, "submit", "10.0.0.3", LIMITS)) is None
    assert anvil.admit(102, (3, "submit", "10.0.0.4", LIMITS)) == TOO_MANY
    assert anvil.holding("submit") == 4
    assert anvil.admit(101, (4, "other", "10.0.0.1", LIMITS)) is None       # own counts
    anvil.release(102, 1)
    assert anvil.admit(101, (5, "submit", "10.0.0.1", LIMITS)) is None


def test_a_refused_or_unknown_slot_is_released_harmlessly() -> None:
    anvil = Anvil()
    assert anvil.admit(101, (1, "submit", "10.0.0.1", Limits(per_client=1))) is None
    assert anvil.admit(101, (2, "submit", "10.0.0.1", Limits(per_client=1))) is not None
    anvil.release(101, 2)                    # refused: it held nothing
    anvil.release(101, 99)                   # never asked
    anvil.release(102, 1)                    # another process's number
    assert anvil.holding("submit") == 1
    anvil.release(101, 1)
    anvil.release(101, 1)                    # twice
    assert anvil.holding("submit") == 0


def test_a_process_that_exits_gives_back_all_its_slots() -> None:
    anvil = Anvil()
    for slot in range(1, 4):
        anvil.admit(101, (slot, "submit", f"10.0.0.{slot}", LIMITS))
    anvil.admit(102, (1, "submit", "10.0.0.9", LIMITS))
    assert anvil.forget(101) == 3
    assert anvil.holding("submit") == 1
    assert anvil.forget(101) == 0


def listener(limit: int = 3, prefix: int = 32) -> ListenerConfig:
    return ListenerConfig(name="submit", protocol="smtp", listen=HostPort("127.0.0.1", 2525),
                          auth_fail_limit=limit, auth_fail_window=600.0,
                          client_ipv4_prefix=prefix)


def test_failed_logins_from_every_process_lock_the_network_once() -> None:
    told: list[tuple[str, str, float]] = []
    metrics = Metrics()
    nets = NetworkFailures(metrics=metrics, on_lock=lambda *a: told.append(a))
    nets.configure([listener(limit=3, prefix=24)])
    nets.failed(("10.1.1.1", "10.1.1.1", "submit", "smtp"))
    nets.failed(("10.1.1.2", "10.1.1.2", "submit", "smtp"))      # same /24
    nets.failed(("10.9.9.9", "10.9.9.9", "submit", "smtp"))      # another network
    assert told == []
    nets.failed(("10.1.1.3", "10.1.1.3", "submit", "smtp"))
    assert told == [("submit", "10.1.1.3", 600.0)]
    nets.failed(("10.1.1.4", "10.1.1.4", "submit", "smtp"))      # seen while locked
    assert len(told) == 2 and told[1][:2] == ("submit", "10.1.1.4")
    assert metrics.auth_lockouts.labels("smtp", "network")._value.get() == 1
    nets.failed(("10.1.1.1", "10.1.1.1", "gone", "smtp"))        # unknown listener
    assert len(told) == 2


def test_a_reload_keeps_the_counts_and_takes_the_new_limit() -> None:
    told: list[tuple[str, str, float]] = []
    nets = NetworkFailures(metrics=None, on_lock=lambda *a: told.append(a))
    nets.configure([listener(limit=5)])
    for _ in range(2):
        nets.failed(("10.1.1.1", "10.1.1.1", "submit", "smtp"))
    nets.configure([listener(limit=3)])
    nets.failed(("10.1.1.1", "10.1.1.1", "submit", "smtp"))
    assert [t[1] for t in told] == ["10.1.1.1"]


def test_a_reload_forgets_the_counts_of_a_removed_listener() -> None:
    told: list[tuple[str, str, float]] = []
    nets = NetworkFailures(metrics=None, on_lock=lambda *a: told.append(a))
    other = ListenerConfig(name="other", protocol="smtp", listen=HostPort("127.0.0.1", 25),
                           auth_fail_limit=3, auth_fail_window=600.0)
    nets.configure([listener(limit=3), other])
    for _ in range(2):                          # one short of the limit, on both
        nets.failed(("10.1.1.1", "10.1.1.1", "submit", "smtp"))
        nets.failed(("10.1.1.1", "10.1.1.1", "other", "smtp"))
    nets.configure([other])                     # "submit" removed by a reload
    nets.failed(("10.1.1.1", "10.1.1.1", "submit", "smtp"))    # a draining session
    assert told == []
    nets.configure([listener(limit=3), other])  # back: it starts from nothing
    nets.failed(("10.1.1.1", "10.1.1.1", "submit", "smtp"))
    assert told == []
    nets.failed(("10.1.1.1", "10.1.1.1", "other", "smtp"))     # kept across reloads
    assert told == [("other", "10.1.1.1", 600.0)]


def test_a_listener_process_refuses_with_421_when_main_does_not_answer() -> None:
    from typing import Any

    from relay.connlimits import UNAVAILABLE
    from relay.listenproc.anvil import RemoteCounter
    from relay.listenproc.channel import ChannelClosed

    sent: list[tuple[str, object, float]] = []

    def answered(result: object = None, exc: BaseException | None = None):  # type: ignore[no-untyped-def]
        def request(kind: str, payload: object, *, timeout: float) -> asyncio.Future[Any]:
            sent.append((kind, payload, timeout))
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
            return fut
        return request

    def closed(kind: str, payload: object) -> None:
        raise ChannelClosed("the other relay process is gone")

    async def run() -> None:
        for exc in (ChannelClosed("gone"), TimeoutError("no answer")):
            counter = RemoteCounter("submit", request=answered(exc=exc), notify=closed)
            slot, fut = counter.ask("10.0.0.1", LIMITS)
            assert await fut == UNAVAILABLE
            counter.release(slot)                      # main gone: nothing to tell
        counter = RemoteCounter("submit", request=answered(TOO_MANY_FROM_CLIENT),
                                notify=lambda k, p: None)
        slot, fut = counter.ask("10.0.0.1", LIMITS)
        assert await fut == TOO_MANY_FROM_CLIENT
        assert sent[-1] == ("admit", (slot, "submit", "10.0.0.1", LIMITS), 10.0)
        counter = RemoteCounter("submit", request=answered(None), notify=lambda k, p: None)
        assert await counter.ask("10.0.0.1", LIMITS)[1] is None

    asyncio.run(run())


class _Channel:
    def __init__(self) -> None:
        self.closed = False
        self.pending: list[object] = []        # what the process "has written"

    def read_pending(self) -> None:
        while self.pending:
            action = self.pending.pop(0)
            assert callable(action)
            action()


class _Rpc:
    def __init__(self) -> None:
        self.channel = _Channel()


class _Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def processes() -> ListenerProcesses:
    lp = ListenerProcesses(2, spool=None)  # type: ignore[arg-type]
    lp._slots = [_Slot(0, proc=_Proc(101), admissions=_Rpc()),  # type: ignore[arg-type]
                 _Slot(1, proc=_Proc(102), admissions=_Rpc())]  # type: ignore[arg-type]
    return lp


def second_from_the_same_client(lp: ListenerProcesses, slot: int = 1
                                ) -> asyncio.Future[str | None]:
    """Process 101 holds 10.0.0.1's only slot; process 102 asks for another: refused for
    now, the answer waits."""
    limits = Limits(per_client=1)
    assert lp.admissions.admit(101, (1, "submit", "10.0.0.1", limits)) is None
    answer = lp.admissions.admit(102, (slot, "submit", "10.0.0.1", limits))
    assert isinstance(answer, asyncio.Future)
    return answer


def released_later(lp: ListenerProcesses, index: int, pid: int, slot: int) -> None:
    """Process ``pid`` has written the release of ``slot``; the main process has not read
    it yet."""
    lp._slots[index].admissions.channel.pending.append(  # type: ignore[union-attr]
        lambda: lp.admissions.release(pid, slot))


async def test_a_refusal_waits_for_releases_already_written_by_the_other_process() -> None:
    lp = processes()
    answer = second_from_the_same_client(lp)
    # 101 released slot 1 before its client read the 221; the reconnect lands on 102,
    # whose admission the main process reads first.
    released_later(lp, 0, 101, 1)
    # at the end of this turn, not after the grace for releases not written yet
    assert await asyncio.wait_for(answer, LATE_GRACE / 2) is None
    assert lp.anvil.holding("submit") == 1


async def test_a_connection_gone_while_its_refusal_waits_holds_nothing() -> None:
    from relay.connlimits import UNAVAILABLE
    lp = processes()
    answer = second_from_the_same_client(lp, slot=7)
    # 102's client went away: its release arrives while the refusal waits, read in the
    # same settle that would otherwise admit it once slot 1 is given back too.
    released_later(lp, 1, 102, 7)
    released_later(lp, 0, 101, 1)
    assert await answer == UNAVAILABLE
    assert lp.anvil.holding("submit") == 0


def test_two_listeners_of_one_process_never_share_a_slot() -> None:
    """Ports 25 and 587 served by the same listener processes (or a listener rebuilt by a
    reload while its old sessions drain): the main process must tell their slots apart,
    or a release gives back another listener's slot and one leaks for good."""
    from typing import Any

    from relay.listenproc.anvil import RemoteCounter

    anvil = Anvil()
    pid = 4242

    def request(kind: str, payload: Any, *, timeout: float) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(anvil.admit(pid, payload))
        return fut

    def notify(kind: str, payload: Any) -> None:
        assert kind == "release"
        anvil.release(pid, payload)

    async def run() -> None:
        smtp = RemoteCounter("smtp", request=request, notify=notify)
        submit = RemoteCounter("submit", request=request, notify=notify)
        held = []
        for counter in (smtp, submit, smtp, submit):
            slot, answer = counter.ask("10.0.0.1", LIMITS)
            assert await answer is None
            held.append((counter, slot))
        assert anvil.holding("smtp") == anvil.holding("submit") == 2
        for counter, slot in held:
            counter.release(slot)
        assert anvil.holding("smtp") == anvil.holding("submit") == 0

    asyncio.run(run())


async def test_a_release_still_on_the_way_turns_a_refusal_into_an_admission(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The client closed without QUIT and reconnected at once to the other process, which
    asked before the first process had read the EOF: the refusal waits LATE_GRACE."""
    from relay.listenproc import anvil as anvil_module
    monkeypatch.setattr(anvil_module, "LATE_GRACE", 1.0)    # far beyond a busy CI's stalls
    lp = processes()
    answer = second_from_the_same_client(lp)
    await asyncio.sleep(0.05)
    assert not answer.done()                          # held past the end of the turn
    released_later(lp, 0, 101, 1)
    assert await asyncio.wait_for(answer, 2) is None
    assert lp.anvil.holding("submit") == 1


async def test_only_count_refusals_are_held_and_only_so_many() -> None:
    from relay.connlimits import TOO_FAST
    from relay.listenproc import anvil as anvil_module
    lp = processes()
    rate = Limits(rate=1)
    assert lp.admissions.admit(101, (1, "submit", "10.0.0.9", rate)) is None
    too_fast = lp.admissions.admit(101, (2, "submit", "10.0.0.9", rate))
    limits = Limits(per_client=1)
    assert lp.admissions.admit(101, (3, "submit", "10.0.0.1", limits)) is None
    held = [lp.admissions.admit(102, (n, "submit", "10.0.0.1", limits))
            for n in range(10, 10 + anvil_module.MAX_LATE + 2)]
    await asyncio.sleep(0.01)
    assert too_fast.result() == TOO_FAST                 # a release cannot change a rate
    assert [f.done() for f in held].count(True) == 2    # beyond MAX_LATE: not held
    started = asyncio.get_running_loop().time()
    assert set(await asyncio.gather(*held)) == {TOO_MANY_FROM_CLIENT}
    assert asyncio.get_running_loop().time() - started >= anvil_module.LATE_GRACE * 0.8
