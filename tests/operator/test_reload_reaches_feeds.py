"""A reload that changes the proxy reaches every open mailbox feed (the UCCX requirement).

Two real Dante instances, a real Dovecot, the real relay process: IMAP sessions idling,
one in the middle of a 16 MB FETCH, a POP3 session between commands. After the upstreams
move from Dante A to Dante B, each session on a "reconnect" listener ends at a safe point
(IDLE: a BYE; the FETCH: only after its last byte and tagged OK; POP3: between commands),
the "keep" listener's session goes on through A, and A's connections go away once
nothing uses them; likewise an SSH tunnel a reload replaced closes with its last channel.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator.support import relay_cli
from tests.peers import free_port, wait_until
from tests.peers.dante import Dante, dante
from tests.peers.dovecot import Dovecot, dovecot
from tests.peers.relayproc import Relay, sample, scrape
from tests.peers.sshd import Sshd, sshd

USER, PASSWORD = "support", "provider-secret"
BIG = 16 * 1024 * 1024
BYE = b"* BYE relay: the way to the mail server changed; please reconnect\r\n"


class Client:
    """A mailbox client on a raw socket: lines and exact byte counts, nothing hidden."""

    def __init__(self, port: int, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:                                  # a slow reader: small buffers
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(60)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            more = self.sock.recv(65536)
            if not more:
                raise EOFError(f"connection closed; got {self.buf[:200]!r}")
            self.buf += more
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            more = self.sock.recv(1024 * 1024)
            if not more:
                raise EOFError(f"closed after {len(self.buf)} of {n} bytes")
            self.buf += more
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def send(self, text: bytes) -> None:
        self.sock.sendall(text)

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        lines = []
        while not (line := self.line()).startswith(tag + b" "):
            lines.append(line)
        assert line.startswith(tag + b" OK"), line
        return lines

    def closed(self) -> bool:
        """True once the peer closed (nothing more, EOF)."""
        if self.buf:
            return False
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def imap_login(port: int, **kw: int) -> Client:
    c = Client(port, **kw)
    assert c.line().startswith(b"* OK")
    c.command(b"a", f"LOGIN {USER} {PASSWORD}".encode())
    c.command(b"b", b"SELECT INBOX")
    return c


def established_to(port: int) -> int:
    """TCP connections on this host whose far end is 127.0.0.1:port (from /proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and fields[2].endswith(f":{port:04X}"):
            count += 1
    return count


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Dovecot, Dante, Dante, bytes]]:
    with contextlib.ExitStack() as stack:
        dc = stack.enter_context(dovecot(users={USER: PASSWORD}))
        dc.deliver(USER, b"Subject: small\r\n\r\nhello\r\n")
        big = b"Subject: big\r\n\r\n" + b"".join(
            b"%07d the quick brown fox jumps over the lazy dog, line after line\r\n" % i
            for i in range(BIG // 72))
        dc.deliver(USER, big)
        a = stack.enter_context(dante(tmp_path / "dante-a"))
        b = stack.enter_context(dante(tmp_path / "dante-b"))
        yield dc, a, b, big


def config(tmp_path: Path, dc: Dovecot, a: Dante, b: Dante, ports: dict[str, int]) -> str:
    text = f"""[relay]
hostname = "relay.test"
spool = "{tmp_path / 'spool'}"

[metrics]
listen = "127.0.0.1:{ports['metrics']}"
"""
    for name in ("a", "b"):
        d = a if name == "a" else b
        text += f"""
[[proxy]]
name = "dante-{name}"
url = "socks5://{d.user}@127.0.0.1:{d.port}"
password_env = "DANTE_PASSWORD"
"""
    for listener, protocol, port, tls, policy in (
            ("imap", "imap", dc.imap, "none", "reconnect"),
            ("imap-tls", "imap", dc.imaps, "implicit", "reconnect"),
            ("imap-keep", "imap", dc.imap, "none", "keep"),
            ("pop3", "pop3", dc.pop3, "none", "reconnect")):
        text += f"""
[[listener]]
name = "{listener}"
protocol = "{protocol}"
listen = "127.0.0.1:{ports[listener]}"
tls = "none"
allow_plaintext_auth = true
upstream = "dovecot-{listener}"
on_upstream_change = "{policy}"

[[upstream]]
name = "dovecot-{listener}"
protocol = "{protocol}"
host = "127.0.0.1"
port = {port}
tls = "{tls}"
ca_file = "{dc.ca_file}"
tls_server_name = "localhost"
auth = "passthrough"
via = "dante-a"
"""
    return text


def test_a_proxy_change_reaches_every_open_feed(
        tmp_path: Path, world: tuple[Dovecot, Dante, Dante, bytes]) -> None:
    dc, a, b, big = world
    ports = {n: free_port() for n in ("imap", "imap-tls", "imap-keep", "pop3", "metrics")}
    relay = Relay(tmp_path, config(tmp_path, dc, a, b, ports))
    relay.start(*(ports[n] for n in ("imap", "imap-tls", "imap-keep", "pop3")),
                env={"DANTE_PASSWORD": a.password})
    clients: list[Client] = []
    try:
        idle = imap_login(ports["imap"])
        kept = imap_login(ports["imap-keep"])
        for c in (idle, kept):
            c.send(b"c IDLE\r\n")
            assert c.line().startswith(b"+ ")
        pop = Client(ports["pop3"])
        assert pop.line().startswith(b"+OK")
        for command in (f"USER {USER}", f"PASS {PASSWORD}", "STAT"):
            pop.send(command.encode() + b"\r\n")
            assert pop.line().startswith(b"+OK")
        fetch = imap_login(ports["imap-tls"], rcvbuf=64 * 1024)
        fetch.send(b"f FETCH 2 BODY.PEEK[]\r\n")
        head = fetch.line()
        assert head == b"* 2 FETCH (BODY[] {%d}\r\n" % len(big), head
        clients += [idle, kept, pop, fetch]
        assert established_to(a.port) == 4 and established_to(b.port) == 0

        relay.config.write_text(relay.config.read_text().replace('via = "dante-a"',
                                                                 'via = "dante-b"'))
        out = relay_cli("reload", "-c", str(relay.config))
        assert out.returncode == 0, out.stderr
        relay.wait_log(r"listener imap-keep: the way to upstream dovecot-imap-keep changed "
                       r"\(proxy dante-a → dante-b\): 1 open session\(s\) stay on the old way")
        relay.wait_log(r"listener imap-tls: the way to upstream dovecot-imap-tls changed "
                       r"\(proxy dante-a → dante-b\): 1 open session\(s\) end at their next "
                       r"safe point")

        # IDLE is a safe point: BYE, then the connection closes.
        assert idle.line() == BYE
        wait_until(idle.closed)
        # POP3 between commands: closed, nothing half-said.
        assert pop.closed()
        # The FETCH is in flight: nothing may end it until its last byte and its OK.
        assert not re.search(r"listener=imap-tls .*ending at a safe point", relay.log_text())
        assert fetch.exactly(len(big)) == big
        assert fetch.line() == b")\r\n"
        assert fetch.line().startswith(b"f OK")
        assert fetch.line() == BYE
        wait_until(fetch.closed)
        # The "keep" session goes on the old way.
        kept.send(b"DONE\r\n")
        assert kept.line().startswith(b"c OK")
        kept.command(b"d", b"NOOP")
        assert established_to(a.port) == 1

        # New sessions take the new way.
        fresh = imap_login(ports["imap"])
        clients.append(fresh)
        wait_until(lambda: established_to(b.port) == 1)
        fresh.command(b"e", b"LOGOUT")
        kept.command(b"e", b"LOGOUT")
        wait_until(lambda: established_to(a.port) == 0)   # nothing uses A: all gone

        metrics = scrape(ports["metrics"])
        for listener, outcome, count in (("imap", "reconnected", 1),
                                         ("imap-tls", "reconnected", 1),
                                         ("pop3", "reconnected", 1),
                                         ("imap-keep", "kept", 1)):
            assert sample(metrics, "relay_proxy_upstream_change_sessions_total",
                          listener=listener, outcome=outcome) == count, listener
        log = relay.log_text()
        assert log.count("ending at a safe point (proxy dante-a → dante-b changed on "
                         "reload)") == 3
        assert "end=upstream_changed" in log
        # Dovecot saw the IDLE session log out, not drop.
        assert "Logged out" in dc.log_text()
    finally:
        for c in clients:
            c.close()
        relay.stop()


def ssh_config(tmp_path: Path, dc: Dovecot, bastions: dict[str, Sshd],
               ports: dict[str, int]) -> str:
    text = f'[relay]\nhostname = "relay.test"\nspool = "{tmp_path / "spool"}"\n\n' \
           '[metrics]\nenabled = false\n'
    for name, s in bastions.items():
        text += f"""
[[proxy]]
name = "{name}"
url = "ssh://{s.user}@127.0.0.1:{s.port}"
key_file = "{s.client_key}"
known_hosts = "{s.known_hosts}"
"""
    for listener, policy in (("imap", "reconnect"), ("imap-keep", "keep")):
        text += f"""
[[listener]]
name = "{listener}"
protocol = "imap"
listen = "127.0.0.1:{ports[listener]}"
tls = "none"
allow_plaintext_auth = true
upstream = "dovecot-{listener}"
on_upstream_change = "{policy}"

[[upstream]]
name = "dovecot-{listener}"
protocol = "imap"
host = "127.0.0.1"
port = {dc.imap}
tls = "none"
auth = "passthrough"
via = "bastion-a"
"""
    return text


def test_the_old_ssh_tunnel_closes_once_nothing_uses_it(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        dc = stack.enter_context(dovecot(users={USER: PASSWORD}, tls=False))
        bastions = {name: stack.enter_context(sshd(tmp_path / name))
                    for name in ("bastion-a", "bastion-b")}
        a, b = bastions["bastion-a"].port, bastions["bastion-b"].port
        ports = {"imap": free_port(), "imap-keep": free_port()}
        relay = Relay(tmp_path, ssh_config(tmp_path, dc, bastions, ports))
        relay.start(*ports.values())
        stack.callback(relay.stop)
        idle, kept = imap_login(ports["imap"]), imap_login(ports["imap-keep"])
        stack.callback(idle.close)
        stack.callback(kept.close)
        for c in (idle, kept):
            c.send(b"c IDLE\r\n")
            assert c.line().startswith(b"+ ")
        assert established_to(a) == 1                # one SSH connection, two channels

        relay.config.write_text(relay.config.read_text().replace('via = "bastion-a"',
                                                                 'via = "bastion-b"'))
        assert relay_cli("reload", "-c", str(relay.config)).returncode == 0
        assert idle.line() == BYE
        fresh = imap_login(ports["imap"])            # the new way: bastion B
        stack.callback(fresh.close)
        assert established_to(b) == 1
        # The kept session still needs A's connection: it stays, and works.
        kept.send(b"DONE\r\n")
        assert kept.line().startswith(b"c OK")
        assert established_to(a) == 1
        assert "SSH connection closed" not in relay.log_text()
        kept.command(b"d", b"LOGOUT")
        wait_until(lambda: established_to(a) == 0)   # its last channel ended: closed
        relay.wait_log(r"SSH bastion bastion-a \(127\.0\.0\.1:\d+\): replaced by a reload "
                       r"and no connection uses it any more: SSH connection closed")
        assert established_to(b) == 1
