"""Real mail clients through relay (mbsync over IMAP, fetchmail over POP3), and via Dante."""

from __future__ import annotations

import asyncio
import imaplib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config.schema import ProxyConfig, Secret
from relay.transports.socks5 import Socks5Transport
from tests.peers import need
from tests.peers.dante import Dante, dante
from tests.peers.dovecot import Dovecot
from tests.proxy.conftest import run_proxy
from tests.proxy.test_proxy_dovecot import imap_fetch_subject, message


async def run(argv: list[str], *, env: dict[str, str] | None = None,
              timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=env)
    async with asyncio.timeout(timeout):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def test_mbsync_syncs_inbox_through_relay(dc: Dovecot, relay_cert: tuple,
                                                tmp_path: Path) -> None:
    mbsync = need("mbsync")
    subject = f"mbsync-{uuid.uuid4().hex}"
    sent = message(subject)
    dc.deliver("alice", sent)
    local = tmp_path / "local"
    local.mkdir()
    async with run_proxy(dc, relay_cert, tls="implicit", up_tls="starttls") as r:
        conf = tmp_path / "mbsyncrc"
        conf.write_text(f"""\
IMAPAccount relay
Host localhost
Port {r.port}
User alice
Pass alice-pw
SSLType IMAPS
CertificateFile {dc.ca_file}
AuthMechs PLAIN

IMAPStore remote
Account relay

MaildirStore local
Path {local}/
Inbox {local}/INBOX

Channel inbox
Far :remote:
Near :local:
Patterns INBOX
Create Near
Sync Pull
SyncState *
""")
        code, out = await run([mbsync, "-c", str(conf), "-a"],
                              env={**os.environ, "HOME": str(tmp_path)})
        assert code == 0, out
    files = [p for sub in ("new", "cur") for p in (local / "INBOX" / sub).iterdir()]
    # mbsync stores LF line ends and adds its own X-TUID header; the rest is what was sent.
    got = [p.read_bytes() for p in files if subject.encode() in p.read_bytes()]
    assert len(got) == 1, out
    lines = [ln for ln in got[0].split(b"\n") if not ln.startswith(b"X-TUID: ")]
    assert b"\n".join(lines) == sent.replace(b"\r\n", b"\n")


async def test_fetchmail_pop3_through_relay(dc: Dovecot, relay_cert: tuple,
                                            tmp_path: Path) -> None:
    fetchmail = need("fetchmail")
    subject = f"fetchmail-{uuid.uuid4().hex}"
    dc.deliver("alice", message(subject))
    out_file = tmp_path / "delivered.mbox"
    async with run_proxy(dc, relay_cert, protocol="pop3", tls="starttls",
                         up_tls="implicit") as r:
        rc = tmp_path / "fetchmailrc"
        rc.write_text(f"""\
set no syslog
poll localhost service {r.port} protocol POP3 auth password timeout 30:
  user "alice" there with password "alice-pw" is "root" here
  sslproto "tls1.2+" sslcertck sslcertfile "{dc.ca_file}"
  keep fetchall
  mda "/bin/sh -c 'cat >> {out_file}'"
""")
        rc.chmod(0o600)
        code, out = await run([fetchmail, "-f", str(rc), "--idfile", str(tmp_path / "ids"),
                               "--pidfile", str(tmp_path / "pid"), "-v"],
                              env={**os.environ, "HOME": str(tmp_path)})
        assert code == 0, out
        assert "STLS" in out          # fetchmail upgraded the connection to relay
    assert subject.encode() in out_file.read_bytes()


@pytest.fixture(scope="module")
def socks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dante]:
    with dante(tmp_path_factory.mktemp("dante")) as d:
        yield d


async def test_imap_through_dante_socks5(dc: Dovecot, socks: Dante) -> None:
    subject = f"socks-{uuid.uuid4().hex}"
    sent = message(subject)
    dc.deliver("alice", sent)
    good = Socks5Transport(ProxyConfig(name="dante", kind="socks5", host=socks.host,
                                       port=socks.port, username=socks.user,
                                       password=Secret(socks.password)))
    async with run_proxy(dc, up_tls="implicit", inner_transport=good, host="127.0.0.1") as r:
        def client() -> bytes:
            m = imaplib.IMAP4("127.0.0.1", r.port)
            m.login("alice", "alice-pw")
            body = imap_fetch_subject(m, subject)
            m.logout()
            return body
        assert await asyncio.to_thread(client) == sent

    # Wrong proxy password: the client hears "try later", the metric names the cause.
    bad = Socks5Transport(ProxyConfig(name="dante", kind="socks5", host=socks.host,
                                      port=socks.port, username=socks.user,
                                      password=Secret("wrong")))
    async with run_proxy(dc, inner_transport=bad, host="127.0.0.1") as r:
        def refused() -> str:
            m = imaplib.IMAP4("127.0.0.1", r.port)
            with pytest.raises(imaplib.IMAP4.error) as exc:
                m.login("alice", "alice-pw")
            m.logout()
            return str(exc.value)
        assert "UNAVAILABLE" in await asyncio.to_thread(refused)
        assert r.metric("relay_proxy_login_failures_total",
                        {"listener": "imap-in", "reason": "proxy_auth_failed"}) == 1
