"""relay's log handler: loop-side lines leave once per loop iteration, in order, and
nothing waits past a warning, a thread, or the process's exit; the timestamp."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from relay.app.logs import LoopBatchedHandler, SecondFormatter

pytestmark = pytest.mark.fast


class Stream:
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def lines(self) -> list[str]:
        return "".join(self.writes).splitlines()


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, Stream]]:
    stream = Stream()
    handler = LoopBatchedHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("relay.test-log-lines")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)


async def test_lines_of_one_loop_iteration_leave_in_one_write(
        logged: tuple[logging.Logger, Stream]) -> None:
    logger, stream = logged
    for i in range(5):
        logger.info("received %d", i)
    assert stream.writes == []                       # not yet: the iteration goes on
    await asyncio.sleep(0)
    assert stream.writes == ["".join(f"INFO received {i}\n" for i in range(5))]
    logger.info("delivered 0")
    await asyncio.sleep(0)
    assert len(stream.writes) == 2 and stream.lines[-1] == "INFO delivered 0"


async def test_a_warning_leaves_at_once_after_what_waits(
        logged: tuple[logging.Logger, Stream]) -> None:
    logger, stream = logged
    logger.info("first")
    logger.warning("second")
    assert stream.lines == ["INFO first", "WARNING second"]      # written before returning
    await asyncio.sleep(0)
    assert stream.lines == ["INFO first", "WARNING second"]      # nothing twice


async def test_a_thread_writes_at_once_and_keeps_the_order(
        logged: tuple[logging.Logger, Stream]) -> None:
    logger, stream = logged
    logger.info("on the loop")
    thread = threading.Thread(target=logger.info, args=("in a thread",))
    thread.start()
    thread.join()
    assert stream.lines == ["INFO on the loop", "INFO in a thread"]


def test_outside_a_loop_and_at_exit_nothing_waits(
        logged: tuple[logging.Logger, Stream]) -> None:
    logger, stream = logged
    logger.info("at start-up")
    assert stream.lines == ["INFO at start-up"]

    async def last_words() -> None:
        logger.info("last line of the loop")     # the loop ends before its flush runs

    loop = asyncio.new_event_loop()
    loop.run_until_complete(last_words())
    loop.close()
    [handler] = [h for h in logger.handlers if isinstance(h, LoopBatchedHandler)]
    handler.flush()                              # what logging.shutdown() does at exit
    assert stream.lines == ["INFO at start-up", "INFO last line of the loop"]


def test_the_timestamp_is_rendered_once_per_second_and_follows_the_clock() -> None:
    datefmt = "%Y-%m-%dT%H:%M:%S"
    formatter = SecondFormatter("%(asctime)s %(message)s", datefmt=datefmt)
    for created in (1_000_000_000.1, 1_000_000_000.9, 1_000_000_001.0, 1_000_000_061.5):
        record = logging.LogRecord("relay", logging.INFO, __file__, 1, "m", None, None)
        record.created = created
        expected = time.strftime(datefmt, time.localtime(created))
        assert formatter.format(record) == f"{expected} m"
