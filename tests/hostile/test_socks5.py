"""A hostile SOCKS5 server: what relay's SOCKS5 transport does with each bad reply.

A fake SOCKS5 server on loopback plays one scripted conversation per case: it reads each
client message in turn (greeting, RFC 1929 login, CONNECT request) and answers with the
case's exact bytes, then hangs up or stalls. relay must fail with the classified reason
(never hand out a socket it cannot trust, never hang past its timeout, never crash);
the control cases show a correct reply does yield a working tunnel.

One table, one runner: add a ``Socks`` row with the server's replies and the reason
relay must give.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from relay.config.schema import ProxyConfig, Secret
from relay.errors import TransportError
from relay.transports.socks5 import Socks5Transport

OK_METHOD, USERPASS = b"\x05\x00", b"\x05\x02"
SUCCESS = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x19"         # bound to 127.0.0.1:25
STALL = b"<stall>"                                           # say nothing more, keep open


@dataclass(frozen=True)
class Socks:
    name: str
    replies: tuple[bytes, ...]         # answer to greeting, [login,] request, in order
    expect: str                        # TransportError.reason, or "tunnel"
    login: bool = False                # relay has a username/password for the proxy


CASES = [
    # -- method selection -----------------------------------------------------------------
    Socks("greeting_reply_wrong_version", (b"\x04\x00",), "proxy_handshake_failed"),
    Socks("no_acceptable_method", (b"\x05\xff",), "proxy_auth_failed"),
    Socks("greeting_reply_truncated", (b"\x05",), "proxy_handshake_failed"),
    Socks("greeting_reply_empty_close", (b"",), "proxy_handshake_failed"),
    Socks("wants_gssapi", (b"\x05\x01",), "proxy_handshake_failed"),
    Socks("wants_login_relay_has_none", (USERPASS,), "proxy_handshake_failed"),
    Socks("http_server_not_socks", (b"HTTP/1.1 400 Bad Request\r\n\r\n",),
          "proxy_handshake_failed"),
    Socks("stalls_after_greeting", (STALL,), "proxy_timeout"),
    # -- RFC 1929 login -----------------------------------------------------------------------
    Socks("login_refused", (USERPASS, b"\x01\x01"), "proxy_auth_failed", login=True),
    Socks("login_reply_wrong_version", (USERPASS, b"\x05\x00"), "proxy_handshake_failed",
          login=True),
    Socks("login_reply_truncated", (USERPASS, b"\x01"), "proxy_handshake_failed", login=True),
    Socks("login_stalls", (USERPASS, STALL), "proxy_timeout", login=True),
    # -- the CONNECT reply ----------------------------------------------------------------------
    Socks("ruleset_refuses", (OK_METHOD, b"\x05\x02\x00\x01" + bytes(6)),
          "proxy_refused_ruleset"),
    Socks("destination_refuses", (OK_METHOD, b"\x05\x05\x00\x01" + bytes(6)),
          "proxy_refused_connection_refused"),
    Socks("host_unreachable", (OK_METHOD, b"\x05\x04\x00\x01" + bytes(6)),
          "proxy_refused_host_unreachable"),
    Socks("unknown_reply_code", (OK_METHOD, b"\x05\x09\x00\x01" + bytes(6)),
          "proxy_handshake_failed"),
    Socks("reply_wrong_version", (OK_METHOD, b"\x04\x00\x00\x01" + bytes(6)),
          "proxy_handshake_failed"),
    Socks("reply_unknown_address_type", (OK_METHOD, b"\x05\x00\x00\x07" + bytes(6)),
          "proxy_handshake_failed"),
    Socks("reply_truncated", (OK_METHOD, b"\x05\x00"), "proxy_handshake_failed"),
    Socks("reply_domain_cut_short", (OK_METHOD, b"\x05\x00\x00\x03\xffabc"),
          "proxy_handshake_failed"),
    Socks("reply_stalls_half_way", (OK_METHOD, b"\x05\x00\x00\x01\x7f", STALL),
          "proxy_timeout"),
    Socks("reply_nonzero_reserved_byte", (OK_METHOD, b"\x05\x00\x07\x01" + bytes(6)),
          "proxy_handshake_failed"),
    # -- controls: correct replies give a tunnel --------------------------------------------------
    Socks("control_no_login", (OK_METHOD, SUCCESS), "tunnel"),
    Socks("control_login", (USERPASS, b"\x01\x00", SUCCESS), "tunnel", login=True),
    Socks("control_bound_to_a_name", (OK_METHOD, b"\x05\x00\x00\x03\x04host\x00\x19"),
          "tunnel"),
]


class BadSocksServer:
    """Answers each client message with the next scripted reply, then hangs up."""

    def __init__(self, replies: tuple[bytes, ...], *, tunnel: bool) -> None:
        self.replies = replies
        self.tunnel = tunnel
        self.received: list[bytes] = []
        self.tunnel_data = b""
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for i, reply in enumerate(self.replies):
                self.received.append(await self._message(reader, i))
                if reply == STALL:
                    await reader.read()                 # until the client gives up
                    return
                writer.write(reply)
                await writer.drain()
            if self.tunnel:
                self.tunnel_data = await reader.read(5)  # bytes through the tunnel
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.done.set()

    async def _message(self, reader: asyncio.StreamReader, i: int) -> bytes:
        """Read greeting, login or request, by what the client sent first."""
        head = await reader.readexactly(2)
        if head[0] == 0x05 and i == 0:                      # greeting: VER NMETHODS METHODS
            return head + await reader.readexactly(head[1])
        if head[0] == 0x01:                                 # RFC 1929: VER ULEN UNAME ...
            user = await reader.readexactly(head[1])
            plen = await reader.readexactly(1)
            return head + user + plen + await reader.readexactly(plen[0])
        rest = await reader.readexactly(2)                  # request: VER CMD RSV ATYP
        atyp = rest[1]
        if atyp == 0x03:
            n = await reader.readexactly(1)
            addr = n + await reader.readexactly(n[0])
        else:
            addr = await reader.readexactly(4 if atyp == 0x01 else 16)
        return head + rest + addr + await reader.readexactly(2)


@pytest.mark.fast
def test_the_catalogue_is_plenty() -> None:
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hostile_socks5_server(case: Socks) -> None:
    fake = BadSocksServer(case.replies, tunnel=case.expect == "tunnel")
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = ProxyConfig(name="bad", kind="socks5", host="127.0.0.1", port=port,
                      username="relay" if case.login else "",
                      password=Secret("proxy-pw") if case.login else None,
                      remote_dns=True, connect_timeout=5)
    started = time.monotonic()
    try:
        if case.expect == "tunnel":
            sock = await Socks5Transport(cfg).connect("mail.example.com", 25, timeout=2.0)
            sock.sendall(b"hello")
            sock.close()
            await asyncio.wait_for(fake.done.wait(), 10)
            assert fake.tunnel_data == b"hello"
        else:
            with pytest.raises(TransportError) as exc:
                await Socks5Transport(cfg).connect("mail.example.com", 25, timeout=1.0)
            assert exc.value.reason == case.expect, exc.value.explain()
            assert "proxy-pw" not in exc.value.explain()
            assert time.monotonic() - started < 5, "relay hung on a bad SOCKS server"
    finally:
        server.close()
        await server.wait_closed()
