"""AUTH: the users file, 535 at once, throttling then refusal, nothing logged that is secret."""

from __future__ import annotations

import base64
import os
import smtplib
import ssl
import stat
import time
from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.sasl import SaslError, parse_plain
from relay.users import UserDB, hash_password, read_users, write_users
from tests.smtp.conftest import PASSWORD, RawClient, Relay, StartRelay, run


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def tls_client(relay: Relay) -> RawClient:
    c = RawClient(relay.port)
    c.reply()
    c.cmd("EHLO x")
    assert c.cmd("STARTTLS").startswith("220 ")
    ctx = ssl.create_default_context()
    relay.ca.configure_trust(ctx)
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    c.cmd("EHLO x")
    return c


async def test_wrong_password_gets_535_at_once_with_smtplib(start_relay: StartRelay) -> None:
    relay = await start_relay()

    def go() -> tuple[float, int, bytes]:
        ctx = ssl.create_default_context()
        relay.ca.configure_trust(ctx)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
            s.starttls(context=ctx)
            start = time.monotonic()
            try:
                s.login("alice", "wrong")
            except smtplib.SMTPAuthenticationError as exc:
                return time.monotonic() - start, exc.smtp_code, exc.smtp_error
        raise AssertionError("login succeeded")

    elapsed, code, text = await run(go)
    assert (code, text) == (535, b"5.7.8 Authentication credentials invalid")
    assert elapsed < 2.0
    assert relay.metrics.registry.get_sample_value(
        "relay_auth_failures_total",
        {"listener": "platform", "protocol": "smtp"}) == 2   # smtplib tries PLAIN, then LOGIN


async def test_repeated_failures_are_slowed_then_refused(start_relay: StartRelay) -> None:
    relay = await start_relay(auth_fail_limit=4, auth_fail_window=60, auth_base_delay=0.5)

    def go() -> tuple[list[tuple[str, float]], str, str, str]:
        c = tls_client(relay)
        timed = []
        for _ in range(3):
            start = time.monotonic()
            timed.append((c.cmd(f"AUTH PLAIN {plain('alice', 'nope')}"),
                          time.monotonic() - start))
        fourth = c.cmd(f"AUTH PLAIN {plain('alice', 'nope')}")
        assert c.closed()
        c.close()
        # a new connection from the same address: refused AUTH, even with the right password
        c2 = tls_client(relay)
        blocked = c2.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
        mail = c2.cmd("MAIL FROM:<a@example.com>")
        c2.close()
        return timed, fourth, blocked, mail

    timed, fourth, blocked, mail = await run(go)
    assert [r for r, _ in timed] == ["535 5.7.8 Authentication credentials invalid"] * 3
    # the first failure is answered at once (only the scrypt check), then delays grow
    assert timed[1][1] >= 0.5 and timed[2][1] >= 1.0
    assert timed[0][1] + 0.5 < timed[2][1]
    assert fourth == "421 4.7.0 Too many failed authentications; closing connection"
    assert blocked == "454 4.7.0 Too many failed authentications; try again later"
    assert mail == "530 5.7.0 Authentication required"
    log = "\n".join(relay.maillog_records)
    assert "nope" not in log and PASSWORD not in log and plain("alice", "nope") not in log
    assert "reason=auth_failed" in log and "user=alice" in log


async def test_auth_exchange_errors(start_relay: StartRelay) -> None:
    relay = await start_relay()

    def go() -> list[str]:
        c = tls_client(relay)
        out = [c.cmd("AUTH CRAM-MD5"), c.cmd("AUTH PLAIN"), c.cmd("*"),
               c.cmd("AUTH PLAIN !!!notbase64"), c.cmd("AUTH LOGIN"), c.cmd("*"),
               c.cmd("AUTH PLAIN " + base64.b64encode(b"admin\0alice\0" +
                                                       PASSWORD.encode()).decode()),
               c.cmd("AUTH PLAIN " + plain("nobody", PASSWORD)),
               c.cmd("AUTH PLAIN " + base64.b64encode(b"alice\0alice\0" +
                                                       PASSWORD.encode()).decode())]
        c.close()
        return out

    out = await run(go)
    assert out[0] == "504 5.5.4 Unrecognized authentication type"
    assert out[1] == "334 " and out[2] == "501 5.7.0 Authentication aborted"
    assert out[3] == "501 5.5.2 Cannot decode base64 response"
    assert out[4] == "334 VXNlcm5hbWU6" and out[5] == "501 5.7.0 Authentication aborted"
    assert out[6] == "535 5.7.8 Authentication credentials invalid"   # authzid != user
    assert out[7] == "535 5.7.8 Authentication credentials invalid"   # unknown user
    assert out[8] == "235 2.7.0 Authentication successful"


async def test_users_file_change_is_picked_up(start_relay: StartRelay, users_file: Path) -> None:
    relay = await start_relay()
    users = read_users(users_file)
    users["carol"] = hash_password("pässwörd".encode())
    await run(write_users, users_file, users)

    def go() -> str:
        c = tls_client(relay)
        r = c.cmd("AUTH PLAIN " + base64.b64encode("\0carol\0pässwörd".encode()).decode())
        c.close()
        return r

    assert await run(go) == "235 2.7.0 Authentication successful"


@pytest.mark.fast
def test_users_file_format_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "users"
    empty = UserDB.load(path)                  # not created yet: nobody can log in
    assert empty.names() == [] and not empty.verify_sync("u1", b"pw")
    write_users(path, {"u1": hash_password(b"pw", n=2**4)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert empty.verify_sync("u1", b"pw")     # created later: picked up at the next login
    db = UserDB.load(path)
    assert db.names() == ["u1"]
    assert db.verify_sync("u1", b"pw") and not db.verify_sync("u1", b"pW")
    assert not db.verify_sync("ghost", b"pw")
    line = path.read_text().strip()
    assert line.startswith("u1:$scrypt$n=16,r=8,p=1$")
    os.chmod(path, 0o640)                      # group-readable (relay's group) is kept
    write_users(path, {"u1": hash_password(b"pw", n=2**4)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable or writable by every user"):
        UserDB.load(path)
    os.chmod(path, 0o600)
    path.write_text("# comment\n\nu1:$scrypt$bad\n")
    with pytest.raises(ConfigError, match=r"users:3: user 'u1': not a \$scrypt\$ hash"):
        UserDB.load(path)
    path.write_text("no colon here\n")
    with pytest.raises(ConfigError, match=r"users:1: not a NAME:HASH line"):
        UserDB.load(path)


@pytest.mark.fast
@pytest.mark.parametrize(("data", "result"), [
    (b"\0user\0pw", ("user", "pw")),
    (b"user\0user\0pw", ("user", "pw")),
    (b"\0user\0", None),
    (b"\0us\rer\0pw", None),
    (b"\0user\0\xff", None),
    (b"other\0user\0pw", None),
    (b"user\0pw", None),
    (b"\0\0pw", None),
    (b"\0a\0b\0c", None),
])
def test_parse_plain_table(data: bytes, result: tuple[str, str] | None) -> None:
    if result is None:
        with pytest.raises(SaslError):
            parse_plain(data)
    else:
        assert parse_plain(data) == result


async def test_no_log_line_carries_credentials(start_relay: StartRelay,
                                               caplog: pytest.LogCaptureFixture) -> None:
    import logging
    caplog.set_level(logging.DEBUG)
    relay = await start_relay()
    secret_user = base64.b64encode(b"alice").decode()
    secret_pw = base64.b64encode(PASSWORD.encode()).decode()

    def go() -> list[str]:
        c = tls_client(relay)
        out = [c.cmd(f"AUTH PLAIN {plain('alice', 'wrong-pw')}"), c.cmd("AUTH LOGIN"),
               c.cmd(secret_user), c.cmd(secret_pw)]
        c.close()
        return out

    out = await run(go)
    assert out[0].startswith("535 ") and out[3].startswith("235 ")
    text = caplog.text + "\n".join(relay.maillog_records)
    for secret in ("wrong-pw", plain("alice", "wrong-pw"), secret_pw, PASSWORD):
        assert secret not in text
