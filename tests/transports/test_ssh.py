"""SSH transport against a real OpenSSH sshd: channels, TLS over them, each failure class."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from relay.config.schema import ProxyConfig
from relay.errors import TransportError
from relay.tls import client_context, server_name
from relay.transports.ssh import SshTransport
from tests.peers import free_port
from tests.peers.sshd import Sshd, keygen, sshd
from tests.transports.helpers import blackhole, smtp_server, upstream_config
from tests.transports.test_socks5 import echo_through


@pytest.fixture(scope="module")
def bastion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with sshd(tmp_path_factory.mktemp("sshd")) as s:
        yield s


def ssh_config(s: Sshd, **kw: object) -> ProxyConfig:
    opts: dict[str, object] = {"name": "bastion", "kind": "ssh", "host": "127.0.0.1",
                               "port": s.port, "username": s.user, "key_file": s.client_key,
                               "known_hosts": s.known_hosts, "connect_timeout": 5.0}
    opts.update(kw)
    return ProxyConfig(**opts)  # type: ignore[arg-type]


async def test_channel_through_sshd_reuses_one_connection(bastion: Sshd,
                                                          echo_port: int) -> None:
    t = SshTransport(ssh_config(bastion))
    try:
        sock1, timings1 = await t.connect_timed("127.0.0.1", echo_port, timeout=10)
        sock2, timings2 = await t.connect_timed("127.0.0.1", echo_port, timeout=10)
        assert set(timings1) == {"ssh_connect", "ssh_channel"}
        assert await echo_through(sock1, b"one\r\n") == b"one\r\n"
        assert await echo_through(sock2, b"two" * 40000) == b"two" * 40000
        assert timings2["ssh_connect"] < timings1["ssh_connect"]
        log = bastion.log.read_text()
        assert log.count("Accepted publickey") >= 1
    finally:
        await t.close()


async def test_starttls_over_ssh_channel(bastion: Sshd, ca: trustme.CA, ca_file: Path) -> None:
    t = SshTransport(ssh_config(bastion))
    try:
        with smtp_server(ca) as (port, recorder):
            up = upstream_config(port, ca_file, via="bastion")
            sock = await t.connect(up.host, up.port, timeout=10)
            smtp = aiosmtplib.SMTP(hostname=server_name(up), sock=sock, start_tls=False,
                                   tls_context=client_context(up), timeout=10)
            await smtp.connect()
            await smtp.starttls()
            await smtp.sendmail("a@example.com", ["c@example.net"], b"Subject: s\r\n\r\nx\r\n")
            await smtp.quit()
        assert recorder.messages[0][1] == ["c@example.net"]
    finally:
        await t.close()


async def test_host_key_mismatch_is_an_error(bastion: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host_key")
    pub = other.with_suffix(".pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{bastion.port} {pub[0]} {pub[1]}\n")
    t = SshTransport(ssh_config(bastion, known_hosts=known))
    with pytest.raises(TransportError) as info:
        await t.connect("127.0.0.1", 25, timeout=10)
    err = info.value
    assert err.reason == "ssh_host_key_mismatch"
    assert "SHA256:" in str(err) and str(known) in str(err)
    assert "ssh-keyscan" in err.hint
    await t.close()


async def test_unknown_host_is_an_error(bastion: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = SshTransport(ssh_config(bastion, known_hosts=empty))
    with pytest.raises(TransportError) as info:
        await t.connect("127.0.0.1", 25, timeout=10)
    assert info.value.reason == "ssh_host_key_mismatch"


async def test_no_known_hosts_is_refused(bastion: Sshd) -> None:
    t = SshTransport(ssh_config(bastion, known_hosts=None))
    with pytest.raises(TransportError) as info:
        await t.connect("127.0.0.1", 25, timeout=10)
    assert info.value.reason == "ssh_config"


async def test_wrong_key_is_auth_failure(bastion: Sshd, tmp_path: Path) -> None:
    t = SshTransport(ssh_config(bastion, key_file=keygen(tmp_path / "stranger")))
    with pytest.raises(TransportError) as info:
        await t.connect("127.0.0.1", 25, timeout=10)
    assert info.value.reason == "ssh_auth_failed"
    assert "authorized_keys" in info.value.hint


async def test_bastion_down_is_unreachable(bastion: Sshd) -> None:
    t = SshTransport(ssh_config(bastion, port=free_port()))
    with pytest.raises(TransportError) as info:
        await t.connect("127.0.0.1", 25, timeout=10)
    assert info.value.reason == "ssh_bastion_unreachable"


async def test_channel_refused_by_permitopen(tmp_path: Path, echo_port: int) -> None:
    with sshd(tmp_path / "sshd", extra="PermitOpen 127.0.0.1:1\n") as s:
        t = SshTransport(ssh_config(s))
        try:
            with pytest.raises(TransportError) as info:
                await t.connect("127.0.0.1", echo_port, timeout=10)
        finally:
            await t.close()
    assert info.value.reason == "ssh_channel_refused"
    assert "administratively prohibited" in str(info.value)
    assert "PermitOpen" in info.value.hint


async def test_bastion_restart_reconnects_with_backoff(tmp_path: Path, echo_port: int) -> None:
    with sshd(tmp_path / "sshd") as s:
        t = SshTransport(ssh_config(s), backoff_initial=0.3, backoff_max=1.0, keepalive=0.5)
        try:
            sock = await t.connect("127.0.0.1", echo_port, timeout=10)
            assert await echo_through(sock, b"before") == b"before"
            s.stop()
            # the connection drops (sshd's session process died with it, or keepalive notices)
            with pytest.raises(TransportError) as first:
                for _ in range(100):
                    sock = await t.connect("127.0.0.1", echo_port, timeout=3)
                    sock.close()
                    await asyncio.sleep(0.05)
            assert first.value.reason == "ssh_bastion_unreachable", first.value.explain()
            with pytest.raises(TransportError) as gated:
                await t.connect("127.0.0.1", echo_port, timeout=3)
            assert "next attempt in" in str(gated.value)
            s.start()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                try:
                    sock = await t.connect("127.0.0.1", echo_port, timeout=3)
                    break
                except TransportError:
                    assert loop.time() < deadline, "did not reconnect within 10 s"
                    await asyncio.sleep(0.1)
            assert await echo_through(sock, b"after") == b"after"
        finally:
            await t.close()


async def test_bastion_blackholed_times_out(bastion: Sshd) -> None:
    with blackhole() as port:
        t = SshTransport(ssh_config(bastion, port=port, connect_timeout=0.5))
        with pytest.raises(TransportError) as info:
            await t.connect("127.0.0.1", 25, timeout=10)
    assert info.value.reason == "ssh_bastion_unreachable"
    assert str(info.value).startswith("connect timed out")
    # a second attempt inside the backoff window fails fast with the same explanation
    with pytest.raises(TransportError) as again:
        await t.connect("127.0.0.1", 25, timeout=10)
    assert "next attempt in" in str(again.value)
