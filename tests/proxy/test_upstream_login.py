"""Upstream login transcripts against a scripted loopback server (unit level, no Dovecot)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from relay.config.schema import Secret, UpstreamConfig
from relay.errors import ProxyUpstreamError
from relay.proxy.upstream import Observer, Stage, UpstreamCredentials, login_upstream
from relay.transports.direct import DirectTransport

# A script answers each line the client sends (None: say nothing) after the greeting.
Script = Callable[[bytes], bytes | None]


@asynccontextmanager
async def scripted(greeting: bytes, script: Script) -> AsyncIterator[tuple[int, list[bytes]]]:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        while line := await reader.readline():
            seen.append(line)
            reply = script(line)
            if reply:
                writer.write(reply)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], seen


def cfg(port: int, protocol: str = "imap") -> UpstreamConfig:
    return UpstreamConfig(name="up", protocol=protocol, host="127.0.0.1",  # type: ignore[arg-type]
                          port=port, tls="none", auth="passthrough", command_timeout=5)


def tagged(reply: bytes) -> Script:
    return lambda line: line.split(b" ", 1)[0] + b" " + reply + b"\r\n"


@pytest.mark.parametrize(("reply", "reason", "credentials"), [
    (b"NO [AUTHENTICATIONFAILED] Authentication failed.", "auth_refused", True),
    (b"NO Invalid credentials", "auth_refused", True),
    (b"NO [PRIVACYREQUIRED] Use TLS", "privacy_required", False),
    (b"NO [UNAVAILABLE] Try later", "provider_unavailable", False),
    (b"BAD what?", "protocol", False),
])
async def test_imap_login_refusals_are_classified(reply: bytes, reason: str,
                                                  credentials: bool) -> None:
    async with scripted(b"* OK hi\r\n", tagged(reply)) as (port, seen):
        with pytest.raises(ProxyUpstreamError) as exc:
            await login_upstream(cfg(port), UpstreamCredentials("u", Secret("p")),
                                 transport=DirectTransport())
    assert exc.value.reason == reason and exc.value.credentials is credentials
    assert seen == [b'R2 LOGIN "u" "p"\r\n']


@pytest.mark.parametrize(("greeting", "reason"), [
    (b"* BYE busy\r\n", "protocol"),
    (b"HTTP/1.1 400 Bad Request\r\n", "protocol"),        # wrong port
])
async def test_bad_greetings(greeting: bytes, reason: str) -> None:
    async with scripted(greeting, tagged(b"OK")) as (port, _):
        with pytest.raises(ProxyUpstreamError) as exc:
            await login_upstream(cfg(port), UpstreamCredentials("u", Secret("p")),
                                 transport=DirectTransport())
    assert exc.value.reason == reason


async def test_login_quotes_and_uses_capabilities_from_the_ok() -> None:
    async with scripted(b"* OK hi\r\n",
                        tagged(b"OK [CAPABILITY IMAP4rev1 IDLE] Logged in")) as (port, seen):
        result = await login_upstream(cfg(port),
                                      UpstreamCredentials('a"b', Secret('p\\w "x"')),
                                      transport=DirectTransport())
        result.channel.close()
    assert seen == [b'R2 LOGIN "a\\"b" "p\\\\w \\"x\\""\r\n']
    assert result.capability == "IMAP4rev1 IDLE" and result.untagged == b""


async def test_non_ascii_password_uses_authenticate_plain_and_asks_capability() -> None:
    def script(line: bytes) -> bytes | None:
        if line.startswith(b"R2 AUTHENTICATE PLAIN"):
            return b"+ \r\n"
        if line.startswith(b"R3 CAPABILITY"):
            return b"* CAPABILITY IMAP4rev1 MOVE\r\nR3 OK done\r\n"
        return b"R2 OK Logged in\r\n"              # the PLAIN response line

    async with scripted(b"* OK hi\r\n", script) as (port, seen):
        result = await login_upstream(cfg(port), UpstreamCredentials("u", Secret("pässwörd")),
                                      transport=DirectTransport())
        result.channel.close()
    assert base64.b64decode(seen[1].strip()) == "\x00u\x00pässwörd".encode()
    assert result.capability is None
    assert result.untagged == b"* CAPABILITY IMAP4rev1 MOVE\r\n"


async def test_xoauth2_error_challenge_is_answered_with_an_empty_line() -> None:
    def script(line: bytes) -> bytes | None:
        if line.startswith(b"R2 AUTHENTICATE XOAUTH2 "):
            return b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n"
        if line == b"\r\n":
            return b"R2 NO [AUTHENTICATIONFAILED] Invalid token\r\n"
        return None

    async def token(source: str) -> str:
        return "tok-" + source

    greeting = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] hi\r\n"
    async with scripted(greeting, script) as (port, seen):
        with pytest.raises(ProxyUpstreamError) as exc:
            await login_upstream(cfg(port), UpstreamCredentials("box@example.com",
                                                                token_source="src"),
                                 transport=DirectTransport(), token_for=token)
    assert exc.value.reason == "auth_refused"
    assert base64.b64decode(seen[0].split()[-1]) == \
        b"user=box@example.com\x01auth=Bearer tok-src\x01\x01"
    assert seen[1] == b"\r\n"
    assert "tok-src" not in str(exc.value)


@pytest.mark.parametrize(("reply", "reason", "credentials"), [
    (b"-ERR [AUTH] Authentication failed.", "auth_refused", True),
    (b"-ERR [SYS/TEMP] Try later", "provider_unavailable", False),
    (b"+OK Logged in.", "", False),
])
async def test_pop3_user_pass(reply: bytes, reason: str, credentials: bool) -> None:
    def script(line: bytes) -> bytes | None:
        return b"+OK\r\n" if line.startswith(b"USER") else reply + b"\r\n"

    async with scripted(b"+OK hi\r\n", script) as (port, seen):
        if not reason:
            result = await login_upstream(cfg(port, "pop3"), UpstreamCredentials("u", Secret("p")),
                                          transport=DirectTransport())
            result.channel.close()
        else:
            with pytest.raises(ProxyUpstreamError) as exc:
                await login_upstream(cfg(port, "pop3"),
                                     UpstreamCredentials("u", Secret("p")),
                                     transport=DirectTransport())
            assert exc.value.reason == reason and exc.value.credentials is credentials
    assert seen == [b"USER u\r\n", b"PASS p\r\n"]


async def test_silent_upstream_times_out() -> None:
    async with scripted(b"* OK hi\r\n", lambda _line: None) as (port, _):
        slow = UpstreamConfig(name="up", protocol="imap", host="127.0.0.1", port=port,
                              tls="none", auth="passthrough", command_timeout=0.3)
        with pytest.raises(ProxyUpstreamError) as exc:
            await login_upstream(slow, UpstreamCredentials("u", Secret("p")),
                                 transport=DirectTransport())
    assert exc.value.reason == "timeout"


# ---- what relay check sees: the observer, the optional CAPABILITY, creds=None ----------

BEGUN: list[str] = []


def recorder() -> tuple[list[Stage], Observer]:
    """The stages that ended; the ones that began go to BEGUN (a "still waiting" line)."""
    stages: list[Stage] = []
    BEGUN.clear()

    def observe(stage: Stage) -> None:
        if stage.running:
            BEGUN.append(stage.name)
        else:
            stages.append(stage)
    return stages, observe


async def test_observer_sees_each_stage_and_changes_nothing_sent() -> None:
    reply = tagged(b"OK [CAPABILITY IMAP4rev1 IDLE] Logged in")
    async with scripted(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n", reply) as (port, seen):
        plain = await login_upstream(cfg(port), UpstreamCredentials("u", Secret("p")),
                                     transport=DirectTransport())
        plain.channel.close()
        stages, observe = recorder()
        watched = await login_upstream(cfg(port), UpstreamCredentials("u", Secret("p")),
                                       transport=DirectTransport(), observer=observe)
        watched.channel.close()
    assert seen == [b'R2 LOGIN "u" "p"\r\n'] * 2
    assert [s.name for s in stages] == ["connect", "greeting", "auth"]
    assert BEGUN == ["greeting", "auth"]          # told as each began, before it ended
    assert stages[1].detail.startswith("* OK [CAPABILITY IMAP4rev1 SASL-IR] hi")
    assert stages[2].detail == "logged in as u (LOGIN)"
    assert all(s.error is None and s.seconds >= 0 for s in stages)
    assert watched.capability == plain.capability == "IMAP4rev1 IDLE"
    assert set(watched.stages) == set(plain.stages) == {"connect", "greeting", "auth"}


async def test_observer_is_told_which_stage_failed_before_the_error_is_raised() -> None:
    async with scripted(b"* OK hi\r\n", tagged(b"NO [AUTHENTICATIONFAILED] nope")) as (port, _):
        stages, observe = recorder()
        with pytest.raises(ProxyUpstreamError) as exc:
            await login_upstream(cfg(port), UpstreamCredentials("u", Secret("pässwörd")),
                                 transport=DirectTransport(), observer=observe)
    assert stages[-1].name == "auth" and stages[-1].error is exc.value
    assert stages[-1].detail == "login as 'u' (AUTHENTICATE PLAIN)"


async def test_capability_is_asked_only_when_wanted_and_creds_none_stops_before_login() -> None:
    def script(line: bytes) -> bytes | None:
        if line.startswith(b"R0 CAPABILITY"):
            return b"* CAPABILITY IMAP4rev1 LOGINDISABLED\r\nR0 OK done\r\n"
        return line.split(b" ", 1)[0] + b" NO unexpected\r\n"

    async with scripted(b"* OK hi\r\n", script) as (port, seen):
        stages, observe = recorder()
        result = await login_upstream(cfg(port), None, transport=DirectTransport(),
                                      observer=observe, capability=True)
        result.channel.close()
    assert seen == [b"R0 CAPABILITY\r\n"]
    assert [s.name for s in stages] == ["connect", "greeting", "capability"]
    assert stages[-1].detail == "IMAP4rev1 LOGINDISABLED"
    assert "auth" not in result.stages


async def test_pop3_capa_is_reported_and_the_token_stage_times_the_fetch() -> None:
    def script(line: bytes) -> bytes | None:
        if line == b"CAPA\r\n":
            return b"+OK\r\nUSER\r\nSASL PLAIN XOAUTH2\r\n.\r\n"
        if line == b"AUTH XOAUTH2\r\n":
            return b"+ \r\n"
        return b"+OK Logged in.\r\n"

    async def token(source: str) -> str:
        return "tok"

    async with scripted(b"+OK hi\r\n", script) as (port, seen):
        stages, observe = recorder()
        result = await login_upstream(cfg(port, "pop3"), UpstreamCredentials(
            "box", token_source="src"), transport=DirectTransport(), token_for=token,
            observer=observe, capability=True)
        result.channel.close()
    assert [s.name for s in stages] == ["connect", "greeting", "capability", "token", "auth"]
    assert stages[2].detail == "USER, SASL PLAIN XOAUTH2"
    assert stages[3].detail == "access token from src"
    assert stages[4].detail == "logged in as box (XOAUTH2)"
    assert seen[:2] == [b"CAPA\r\n", b"AUTH XOAUTH2\r\n"]
