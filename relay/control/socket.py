"""The control socket: JSON-lines requests to the running relay over a Unix socket.

One request per line, ``{"command": "list", "args": {...}}``; one reply per line,
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "...", "hint": "...",
"code": "not_found"}``. A connection may carry several requests in turn. The socket is
created with mode 0600 (0660 if asked) inside the spool directory (itself 0700): whoever
can reach it may steer the queue, so nothing else authenticates.

The queue commands go to a ``QueueManager``; the app adds its own (``reload``,
``status``) as a mapping of command name to ``async def handler(args) -> dict``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from relay.acceptloop import AcceptLoop, bind_unix
from relay.control.queue import COMMANDS, QueueManager
from relay.errors import ControlError, RelayError

log = logging.getLogger("relay.control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_LINE = 1024 * 1024          # requests are tiny; replies (a long list) may be large
IDLE_TIMEOUT = 300.0            # a client that sends nothing for this long is dropped


class ControlServer:
    """Serves control requests on ``path`` while the relay runs."""

    def __init__(self, manager: QueueManager | None, path: Path, *,
                 commands: Mapping[str, Handler] | None = None, mode: int = 0o600) -> None:
        self.path = Path(path)
        self._manager = manager
        self._commands = dict(commands or {})
        self._mode = mode
        self._server: AcceptLoop | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) and start serving."""
        await self._clear_stale()
        sock = None
        try:
            sock = bind_unix(self.path)
            os.chmod(self.path, self._mode)
        except OSError as exc:
            if sock is not None:
                sock.close()
            hint = "check that the directory exists and is writable"
            if len(os.fsencode(self.path)) > 107:
                hint = "the path is longer than a Unix socket allows (107 bytes); set " \
                       "[relay] control_socket to a shorter path"
            raise ControlError(f"cannot create the control socket {self.path}: "
                               f"{exc.strerror or exc}", code="internal", hint=hint) from exc

        def protocol() -> asyncio.StreamReaderProtocol:
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=MAX_LINE),
                                                self._serve)
        self._server = AcceptLoop("control", [sock], protocol)
        self._server.start()
        log.info("control socket listening on %s", self.path)

    async def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket", code="internal",
                               hint="move that file away or set [relay] control_socket "
                                    "to another path")
        try:
            _reader, writer = await asyncio.open_unix_connection(str(self.path))
        except OSError:
            os.unlink(self.path)                # left by a relay that died: ours now
            return
        writer.close()
        raise ControlError(f"another process answers on the control socket {self.path}",
                           code="internal",
                           hint="another relay uses this socket path: give each relay its "
                                "own [relay] control_socket")

    async def stop(self) -> None:
        """Stop accepting, end open connections, remove the socket file."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(self._clients)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    line = await reader.readline()
                if not line:
                    break
                reply = await self._answer(line)
                writer.write(json.dumps(reply, ensure_ascii=False).encode() + b"\n")
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except ValueError:                       # line over MAX_LINE
            with contextlib.suppress(ConnectionError):
                writer.write(_error_line(ControlError("request too long", code="bad_request")))
                await writer.drain()
        except asyncio.CancelledError:
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ValueError("not an object with a command")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError("args is not an object")
        except ValueError as exc:
            return _error(ControlError(f"malformed request: {exc}", code="bad_request"))
        command: str = request["command"]
        try:
            if command in self._commands:
                result = await self._commands[command](args)
            elif command in COMMANDS and self._manager is not None:
                result = await self._manager.handle(command, args)
            else:
                known = sorted({*self._commands, *(COMMANDS if self._manager else ())})
                raise ControlError(f"unknown command {command!r}", code="bad_request",
                                   hint=f"this relay knows: {', '.join(known)}")
        except RelayError as exc:
            return _error(exc)
        except Exception as exc:
            log.exception("control command %s failed", command)
            return _error(ControlError(f"{command} failed inside relay: {exc}",
                                       code="internal", hint="see relay's log"))
        return {"ok": True, "result": result}


def _error(exc: RelayError) -> dict[str, Any]:
    return {"ok": False, "error": str(exc), "hint": exc.hint,
            "code": getattr(exc, "code", "error")}


def _error_line(exc: RelayError) -> bytes:
    return json.dumps(_error(exc)).encode() + b"\n"


async def request(path: Path | str, command: str, *, timeout: float = 300.0,
                  **args: Any) -> dict[str, Any]:
    """Send one command to the relay listening on ``path``; its result, or ControlError."""
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=64 * MAX_LINE)
            except OSError as exc:
                raise ControlError(
                    f"no relay answers on the control socket {path} "
                    f"({getattr(exc, 'strerror', None) or exc})", code="unreachable",
                    hint="relay holds the spool lock but does not answer: it may be "
                         "starting or stopping; try again in a moment, and check its log "
                         "and [relay] control_socket") from exc
            try:
                body = {"command": command, "args": args}
                writer.write(json.dumps(body).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        raise ControlError(f"relay did not answer {command!r} within {timeout:.0f} s",
                           code="unreachable",
                           hint="a delete waits for a delivery attempt in flight; try "
                                "again, or raise --timeout") from None
    if not line:
        raise ControlError("relay closed the control connection without answering",
                           code="unreachable", hint="see relay's log")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "request failed"),
                           code=reply.get("code", "error"), hint=reply.get("hint", ""))
    result: dict[str, Any] = reply.get("result", {})
    return result
