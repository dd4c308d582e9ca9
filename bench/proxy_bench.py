"""IMAP proxy bench: relay vs direct against the same Dovecot, in one run.

Measures, side by side:
  * FETCH of a 50 MB message through relay and directly (median MB/s over rounds), and
    relay's CPU milliseconds per FETCH (from /proc/<relay pid>/stat);
  * login+SELECT latency through relay and directly (median over rounds);
  * relay's resident memory holding 2,000 idle logged-in IMAP sessions;
  * 10,000 logged-in sessions held at once (each answers a NOOP), without error.

relay runs in its own process (this file with ``--serve``) so its CPU and memory are its
own. Needs root (Dovecot, raised RLIMIT_NOFILE) and Debian's dovecot-imapd.

    python bench/proxy_bench.py                # full run
    python bench/proxy_bench.py --quick        # fewer rounds and sessions (smoke run)
    python bench/proxy_bench.py --on-upstream-change keep   # sessions not watched for
                                                            # safe points (the default
                                                            # "reconnect" watches them)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

USER, PASSWORD = "bench", "bench-pw"
TAG_CLK = os.sysconf("SC_CLK_TCK")


# -- relay in its own process --------------------------------------------------------------
async def serve(upstream_port: int, tls: str, ca_file: str, kernel_splice: bool,
                cert: str, on_upstream_change: str) -> None:
    from relay.config.schema import HostPort, ListenerConfig, UpstreamConfig
    from relay.metrics import Metrics
    from relay.proxy.accounts import PassthroughAuthenticator
    from relay.proxy.listener import ProxyListener
    from relay.transports.direct import DirectTransport

    logging.basicConfig(level=logging.WARNING)
    up = UpstreamConfig(name="dovecot", protocol="imap", host="localhost", port=upstream_port,
                        tls=tls, ca_file=Path(ca_file) if ca_file else None,  # type: ignore[arg-type]
                        auth="passthrough")
    cfg = ListenerConfig(name="imap", protocol="imap", listen=HostPort("127.0.0.1", 0),
                         tls="implicit" if cert else "none",
                         cert=Path(cert) if cert else None, key=Path(cert) if cert else None,
                         upstream="dovecot", max_connections=50_000,
                         max_connections_per_client=50_000, login_timeout=300,
                         on_upstream_change=on_upstream_change)  # type: ignore[arg-type]
    transport = DirectTransport()
    listener = ProxyListener(cfg, upstream=up, authenticator=PassthroughAuthenticator(),
                             transport_for=lambda _u: transport, metrics=Metrics(),
                             kernel_splice=kernel_splice)
    await listener.start()
    print(f"PORT {listener.address[1]}", flush=True)
    await asyncio.Event().wait()


def raise_nofile(n: int) -> int:
    """Raise RLIMIT_NOFILE to ``n`` (or as far as the hard limit allows); the new limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, n), max(hard, n)))
    except (ValueError, OSError):             # no CAP_SYS_RESOURCE: the hard limit caps us
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000.0 / TAG_CLK    # utime + stime


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


# -- a minimal blocking IMAP client --------------------------------------------------------
class Imap:
    def __init__(self, port: int, ctx: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(sock, server_hostname="localhost") if ctx else sock
        self.buf = bytearray()
        self.until(b"\r\n")

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        end = self.buf.index(marker) + len(marker)
        data = bytes(self.buf[:end])
        del self.buf[:end]
        return data

    def command(self, tag: bytes, line: bytes) -> bytes:
        self.sock.sendall(tag + b" " + line + b"\r\n")
        out = b""
        while True:
            ln = self.until(b"\r\n")
            out += ln
            if ln.startswith(tag + b" "):
                if not ln.startswith(tag + b" OK"):
                    raise RuntimeError(ln.decode(errors="replace"))
                return out

    def fetch_big(self, uid: bytes) -> int:
        """UID FETCH the literal without keeping it: returns the literal size."""
        self.sock.sendall(b"F UID FETCH " + uid + b" BODY.PEEK[]\r\n")
        head = self.until(b"}\r\n")
        size = int(head[head.rindex(b"{") + 1:-3])
        if len(self.buf) >= size:
            del self.buf[:size]
        else:
            left = size - len(self.buf)
            self.buf.clear()
            view = memoryview(bytearray(1 << 20))
            while left > 0:
                n = self.sock.recv_into(view, min(left, len(view)))
                if not n:
                    raise ConnectionError("closed during FETCH")
                left -= n
        self.until(b"\r\nF OK")
        self.until(b"\r\n")
        return size

    def close(self) -> None:
        self.sock.close()


def fetch_rounds(direct: int, relay: int, pid: int, rounds: int, size: int,
                 ctx: ssl.SSLContext | None = None) -> tuple[dict[str, list[float]],
                                                             list[float]]:
    """Alternate FETCHes direct and through relay; MB/s per side and relay CPU ms each."""
    clients = {}
    for name, p in (("direct", direct), ("relay", relay)):
        c = Imap(p, ctx)
        c.command(b"L", f"LOGIN {USER} {PASSWORD}".encode())
        reply = c.command(b"S", b"SELECT INBOX")
        assert b"1 EXISTS" in reply, reply
        clients[name] = c
    speeds: dict[str, list[float]] = {"direct": [], "relay": []}
    cpu: list[float] = []
    for _ in range(rounds):
        for name in ("direct", "relay"):
            before = proc_cpu_ms(pid)
            start = time.perf_counter()
            got = clients[name].fetch_big(b"1")
            took = time.perf_counter() - start
            assert got == size, (got, size)
            speeds[name].append(got / took / 1e6)
            if name == "relay":
                cpu.append(proc_cpu_ms(pid) - before)
    for c in clients.values():
        c.close()
    return speeds, cpu


def login_select(port: int) -> float:
    start = time.perf_counter()
    c = Imap(port)
    c.command(b"L", b"LOGIN " + USER.encode() + b" " + PASSWORD.encode())
    c.command(b"S", b"SELECT INBOX")
    took = time.perf_counter() - start
    c.command(b"Q", b"LOGOUT")
    c.close()
    return took


# -- many sessions -------------------------------------------------------------------------
async def open_sessions(port: int, n: int, conns: list, errors: list[str]) -> None:
    sem = asyncio.Semaphore(100)
    login = f"a LOGIN {USER} {PASSWORD}\r\n".encode()

    async def one() -> None:
        async with sem:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await reader.readline()
                writer.write(login)
                while True:
                    line = await reader.readline()
                    if not line:
                        raise ConnectionError("closed during login")
                    if line.startswith(b"a "):
                        if not line.startswith(b"a OK"):
                            raise RuntimeError(line.decode(errors="replace").strip())
                        break
                conns.append((reader, writer))
            except (OSError, RuntimeError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one() for _ in range(n)))


async def noop_all(conns: list) -> int:
    sem = asyncio.Semaphore(500)
    ok = 0

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal ok
        async with sem:
            writer.write(b"n NOOP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b"n "):
                    ok += line.startswith(b"n OK")
                    return

    await asyncio.gather(*(one(r, w) for r, w in conns))
    return ok


async def hold(port: int, pid: int, idle_n: int, total_n: int) -> dict[str, float | str]:
    conns: list = []
    errors: list[str] = []
    base = proc_rss_mb(pid)
    await open_sessions(port, idle_n, conns, errors)
    await asyncio.sleep(1.0)                      # let freed login buffers settle
    rss_idle = proc_rss_mb(pid)
    n_idle = len(conns)
    start = time.monotonic()
    await open_sessions(port, total_n - len(conns), conns, errors)
    opened = time.monotonic() - start
    rss_total = proc_rss_mb(pid)
    alive = await asyncio.wait_for(noop_all(conns), 300)
    for _, w in conns:
        w.close()
    return {"base": base, "rss_idle": rss_idle, "n_idle": n_idle, "held": len(conns),
            "alive": alive, "rss_total": rss_total, "open_s": opened,
            "errors": "; ".join(sorted(set(errors))[:3]) or "none", "n_errors": len(errors)}


# -- the run -------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=0, help="FETCH rounds (default 7, quick 3)")
    ap.add_argument("--sessions", type=int, default=0,
                    help="sessions to hold (default 10000, quick 2000; 0 skips nothing)")
    ap.add_argument("--no-kernel-splice", action="store_true",
                    help="relay moves bytes through asyncio transports even without TLS")
    ap.add_argument("--on-upstream-change", choices=("reconnect", "keep"),
                    default="reconnect", help="the listener setting: reconnect (default) "
                    "watches each session for safe points, keep does not")
    ap.add_argument("--serve", type=int, metavar="UPSTREAM_PORT", help=argparse.SUPPRESS)
    ap.add_argument("--tls", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--ca", default="", help=argparse.SUPPRESS)
    ap.add_argument("--cert", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    nofile = raise_nofile(65536)
    if args.serve:
        asyncio.run(serve(args.serve, args.tls, args.ca, not args.no_kernel_splice, args.cert,
                          args.on_upstream_change))
        return 0

    from tests.peers.dovecot import dovecot

    rounds, lat_rounds = (3, 20) if args.quick else (7, 100)
    idle_n, total_n = (500, 2000) if args.quick else (2000, 10_000)
    rounds = args.rounds or rounds
    total_n = args.sessions or total_n
    asked = total_n
    total_n = min(total_n, (nofile - 200) // 2)    # relay needs two descriptors per session
    idle_n = min(idle_n, total_n)
    if total_n < asked:
        print(f"RLIMIT_NOFILE is {nofile} and cannot be raised here (no CAP_SYS_RESOURCE): "
              f"holding {total_n} sessions instead of {asked} (two descriptors each)")
    body = base64.encodebytes(os.urandom(38 * 1024 * 1024)).replace(b"\n", b"\r\n")
    msg = b"From: a@example.com\r\nSubject: big\r\n\r\n" + body
    with dovecot(users={USER: PASSWORD}, max_sessions=total_n + 500) as dc:
        dc.deliver(USER, msg)
        argv = [sys.executable, __file__, "--serve", str(dc.imap),
                "--on-upstream-change", args.on_upstream_change]
        if args.no_kernel_splice:
            argv.append("--no-kernel-splice")
        relay = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        cert = dc.root / "relay-cert.pem"
        dc.ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(cert))
        tls_relay = subprocess.Popen([sys.executable, __file__, "--serve", str(dc.imaps),
                                      "--tls", "implicit", "--ca", str(dc.ca_file),
                                      "--cert", str(cert), "--on-upstream-change",
                                      args.on_upstream_change], stdout=subprocess.PIPE,
                                     text=True)
        try:
            assert relay.stdout is not None and tls_relay.stdout is not None
            port = int(relay.stdout.readline().split()[1])
            tls_port = int(tls_relay.stdout.readline().split()[1])
            print(f"message {len(msg) / 1e6:.1f} MB; Dovecot {dc.imap}, relay {port} "
                  f"(pid {relay.pid}); {rounds} FETCH rounds, {lat_rounds} login rounds; "
                  f"kernel splice {'off' if args.no_kernel_splice else 'on'}; "
                  f"on_upstream_change = {args.on_upstream_change}; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
            speeds, cpu = fetch_rounds(dc.imap, port, relay.pid, rounds, len(msg))
            tls_speeds, tls_cpu = fetch_rounds(dc.imaps, tls_port, tls_relay.pid, rounds,
                                               len(msg), ssl.create_default_context(
                                                   cafile=str(dc.ca_file)))
            lat = {"direct": [], "relay": []}
            for _ in range(lat_rounds):
                for name, p in (("direct", dc.imap), ("relay", port)):
                    lat[name].append(login_select(p) * 1000)
            held = asyncio.run(hold(port, relay.pid, idle_n, total_n))
        finally:
            for child in (relay, tls_relay):
                child.terminate()
                child.wait(10)

    d, r = statistics.median(speeds["direct"]), statistics.median(speeds["relay"])
    ld, lr = statistics.median(lat["direct"]), statistics.median(lat["relay"])
    per_session_kb = (float(held["rss_idle"]) - float(held["base"])) * 1024 / max(
        1, float(held["n_idle"]))
    print()
    print(f"{'measure':44} {'relay':>12} {'direct':>12}   target")
    print(f"{'FETCH 50 MB, median MB/s':44} {r:12.0f} {d:12.0f}   ratio {r / d:.2f} "
          f"(target >= 0.90) {'PASS' if r / d >= 0.9 else 'FAIL'}")
    print(f"{'  relay CPU ms per FETCH (mean)':44} {sum(cpu) / len(cpu):12.1f} "
          f"{'':12}   (nginx ~20 ms)")
    td, tr = statistics.median(tls_speeds["direct"]), statistics.median(tls_speeds["relay"])
    print(f"{'FETCH 50 MB over TLS both ways, median MB/s':44} {tr:12.0f} {td:12.0f}   "
          f"ratio {tr / td:.2f}")
    print(f"{'  relay CPU ms per TLS FETCH (mean)':44} {sum(tls_cpu) / len(tls_cpu):12.1f}")
    print(f"{'login+SELECT, median ms':44} {lr:12.2f} {ld:12.2f}   +{lr - ld:.2f} ms "
          f"(target <= +2 ms) {'PASS' if lr - ld <= 2 else 'FAIL'}")
    print(f"{'  p90 ms':44} {statistics.quantiles(lat['relay'], n=10)[-1]:12.2f} "
          f"{statistics.quantiles(lat['direct'], n=10)[-1]:12.2f}")
    print(f"{'relay RSS before sessions, MB':44} {held['base']:12.1f}")
    label = f"relay RSS with {held['n_idle']} idle sessions, MB"
    print(f"{label:44} "
          f"{held['rss_idle']:12.1f} {'':12}   (target < 60) "
          f"{'PASS' if float(held['rss_idle']) < 60 and held['n_idle'] == idle_n else 'FAIL'}")
    print(f"{'  per idle session, KB':44} {per_session_kb:12.1f}")
    verdict = ("PASS" if held["alive"] == asked else
               "all opened held; see the RLIMIT note" if held["alive"] == total_n else "FAIL")
    print(f"{'sessions held (answered NOOP) / opened':44} {held['alive']:>12} {total_n:>12}   "
          f"target {asked}: {verdict}")
    print(f"{'  relay RSS with all held, MB':44} {held['rss_total']:12.1f}")
    print(f"{'  time to open and log in the rest, s':44} {held['open_s']:12.1f}")
    print(f"{'  errors':44} {held['n_errors']:>12}   {held['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
