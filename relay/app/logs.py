"""Process logging: one line format for the main and every listener process (stderr/journal).

Lines logged on the event loop below WARNING (the mail log's one line per message event,
mostly) wait for the end of the loop iteration and leave together in one write: under
load a process logs several per iteration, and a write per line cost 4 % of the main
process's loop (a syscall each, and a journald wakeup each in production). WARNING and
above, and anything logged outside the loop (threads, start-up, exit), are written at
once, after whatever waits, so the order of lines is kept. ``logging.shutdown`` (at exit)
flushes what waits; only a kill -9 can lose lines, and then only those of the iteration
it interrupted.

A line costs about 18 us of CPU through ``logging``; relay's format needs neither the
caller's file and line nor the thread's name, so ``setup_logging`` turns off their
collection (the caller's alone is a walk up the stack per line), and the formatter
renders each second's timestamp once (``SecondFormatter``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TextIO

LOG_FORMAT = "%(asctime)s relay[%(process)d]: %(name)s: %(levelname)s: %(message)s"


class SecondFormatter(logging.Formatter):
    """``logging.Formatter`` that renders ``%(asctime)s`` once per second, not per line
    (for a ``datefmt`` without fractions of a second, as relay's)."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord,
                   datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._text = super().formatTime(record, datefmt)
            self._second = second
        return self._text


class LoopBatchedHandler(logging.StreamHandler[TextIO]):
    """A stream handler whose loop-side INFO/DEBUG lines leave once per loop iteration."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:     # called holding self.lock
        try:
            line = self.format(record) + self.terminator
            if record.levelno < logging.WARNING:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
                if loop is not None:
                    self._pending.append(line)
                    if not self._scheduled:
                        self._scheduled = True
                        loop.call_soon(self._flush_pending)
                    return
            self._write(line)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _write(self, line: str) -> None:
        if self._pending:
            line = "".join(self._pending) + line
            self._pending.clear()
        if line:
            self.stream.write(line)
            self.stream.flush()

    def _flush_pending(self) -> None:
        with self.lock:                       # type: ignore[union-attr]  # (an RLock)
            self._scheduled = False
            self.flush()

    def flush(self) -> None:
        with self.lock:                                    # type: ignore[union-attr]
            try:
                self._write("")
            except Exception:
                self._pending.clear()              # the stream is gone: nowhere to say so
        super().flush()


def setup_logging(level: str) -> None:
    handler = LoopBatchedHandler(sys.stderr)
    handler.setFormatter(SecondFormatter(LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    # Not in LOG_FORMAT, so not worth collecting for every record: the caller's file and
    # line (``_srcfile = None`` is logging's documented switch for that), thread names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        handlers=[handler])
    # Library chatter is not operator information.
    for noisy in ("mail.log", "asyncio", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
