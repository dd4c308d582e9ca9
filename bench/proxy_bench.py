"""IMAP proxy bench: Dovecot direct, nginx's mail proxy and relay, side by side in one run.

Measures, in one invocation against one private Dovecot:
  * FETCH of a 50 MB message directly, through nginx (``bench/proxy_peers.py``: one
    worker, 64 KB buffers) and through relay (``relay run`` with its shipped defaults,
    passthrough login), alternating, median MB/s, and CPU milliseconds per FETCH of each
    proxy (all its processes and threads, from /proc);
  * the same with TLS: relay with TLS on both legs, nginx on the client leg only (its
    mail proxy cannot speak TLS to a backend), direct over TLS;
  * which path relay's plain sessions took, from its ``relay_proxy_splices_total``
    metric (kernel splice is the default for plain TCP on both legs);
  * login+SELECT latency through relay and directly;
  * relay's resident memory per idle logged-in session, and sessions held from one
    client address with relay's default limits, each answering a NOOP.

Needs root (Dovecot, raised RLIMIT_NOFILE) and Debian's dovecot-imapd, nginx and
libnginx-mod-mail. Take figures on a quiet machine (``uptime`` under 1.0 on the 2-core
reference VM); the load is printed.

    python bench/proxy_bench.py                # full run (7 FETCH rounds, 9,900 sessions)
    python bench/proxy_bench.py --quick        # fewer rounds and sessions (smoke run)
    python bench/proxy_bench.py --on-upstream-change keep   # sessions not watched for
                                                            # safe points (the default
                                                            # "reconnect" watches them)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_peers import NginxMail, RelayProxy, rss_mb, tree_cpu_ms
from smtp_peers import exit_on_sigterm

USER, PASSWORD = "bench", "bench-pw"


def raise_nofile(n: int) -> int:
    """Raise RLIMIT_NOFILE to ``n`` (or as far as the hard limit allows); the new limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, n), max(hard, n)))
    except (ValueError, OSError):             # no CAP_SYS_RESOURCE: the hard limit caps us
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


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


def fetch_rounds(sides: dict[str, tuple[int, int | None]], rounds: int, size: int,
                 ctx: ssl.SSLContext | None = None) -> tuple[dict[str, list[float]],
                                                             dict[str, list[float]]]:
    """Alternate FETCHes over ``sides`` (name: port, proxy pid or None for direct).

    Returns MB/s per side and, for proxies, CPU ms per FETCH.
    """
    clients = {}
    for name, (port, _) in sides.items():
        c = Imap(port, ctx)
        c.command(b"L", f"LOGIN {USER} {PASSWORD}".encode())
        reply = c.command(b"S", b"SELECT INBOX")
        assert b"1 EXISTS" in reply, reply
        clients[name] = c
    speeds: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name, (_, pid) in sides.items() if pid}
    for _ in range(rounds):
        for name, (_, pid) in sides.items():
            before = tree_cpu_ms(pid) if pid else 0.0
            start = time.perf_counter()
            got = clients[name].fetch_big(b"1")
            took = time.perf_counter() - start
            assert got == size, (got, size)
            speeds[name].append(got / took / 1e6)
            if pid:
                cpu[name].append(tree_cpu_ms(pid) - before)
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
    base = rss_mb(pid)
    await open_sessions(port, idle_n, conns, errors)
    await asyncio.sleep(1.0)                      # let freed login buffers settle
    rss_idle = rss_mb(pid)
    n_idle = len(conns)
    start = time.monotonic()
    await open_sessions(port, total_n - len(conns), conns, errors)
    opened = time.monotonic() - start
    rss_total = rss_mb(pid)
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
                    help="sessions to hold from one address (default 9900, quick 2000)")
    ap.add_argument("--on-upstream-change", choices=("reconnect", "keep"),
                    default="reconnect", help="the proxy listeners' setting: reconnect "
                    "(the default) watches each session for safe points, keep does not")
    args = ap.parse_args()
    exit_on_sigterm()
    nofile = raise_nofile(65536)

    from tests.peers.dovecot import dovecot

    rounds, lat_rounds = (3, 20) if args.quick else (7, 100)
    idle_n, total_n = (500, 2000) if args.quick else (2000, 9900)
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
    load0 = os.getloadavg()[0]
    with dovecot(users={USER: PASSWORD}, max_sessions=total_n + 500) as dc, \
            tempfile.TemporaryDirectory(prefix="relay-proxybench-") as tmp:
        dc.deliver(USER, msg)
        work = Path(tmp)
        cert = work / "proxy-cert.pem"
        dc.ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(cert))
        cert.chmod(0o600)            # it holds the key: relay refuses a key others may read
        relay = RelayProxy(work, imap=dc.imap, imaps=dc.imaps, ca_file=dc.ca_file, cert=cert,
                           on_upstream_change=args.on_upstream_change)
        nginx = NginxMail(work, imap=dc.imap, cert=cert, sessions=64)
        try:
            print(f"message {len(msg) / 1e6:.1f} MB; Dovecot {dc.imap}, nginx {nginx.port} "
                  f"(pid {nginx.pid}), relay {relay.port} (pid {relay.pid}); {rounds} FETCH "
                  f"rounds, {lat_rounds} login rounds; load average {load0:.1f} on "
                  f"{os.cpu_count()} CPUs", flush=True)
            speeds, cpu = fetch_rounds({"direct": (dc.imap, None),
                                        "nginx": (nginx.port, nginx.pid),
                                        "relay": (relay.port, relay.pid)}, rounds, len(msg))
            paths = {p: relay.metric("relay_proxy_splices_total", listener="imap", path=p)
                     for p in ("kernel", "transport")}
            tls_speeds, tls_cpu = fetch_rounds(
                {"direct": (dc.imaps, None), "nginx": (nginx.tls_port, nginx.pid),
                 "relay": (relay.tls_port, relay.pid)}, rounds, len(msg),
                ssl.create_default_context(cafile=str(dc.ca_file)))
            lat: dict[str, list[float]] = {"direct": [], "relay": []}
            for _ in range(lat_rounds):
                for name, p in (("direct", dc.imap), ("relay", relay.port)):
                    lat[name].append(login_select(p) * 1000)
            held = asyncio.run(hold(relay.port, relay.pid, idle_n, total_n))
        finally:
            relay.stop()
            nginx.stop()
    report(speeds, cpu, tls_speeds, tls_cpu, paths, lat, held, idle_n, total_n, asked,
           load0, os.getloadavg()[0])
    return 0


def report(speeds: dict[str, list[float]], cpu: dict[str, list[float]],
           tls_speeds: dict[str, list[float]], tls_cpu: dict[str, list[float]],
           paths: dict[str, float], lat: dict[str, list[float]], held: dict[str, float | str],
           idle_n: int, total_n: int, asked: int, load0: float, load1: float) -> None:
    med = statistics.median
    print(f"\nmedians; load average {load0:.2f} before, {load1:.2f} after")
    print(f"{'FETCH 50 MB':32}{'MB/s':>8}{'x direct':>10}{'CPU ms/FETCH':>14}")
    for title, sp, cp in (("plain TCP both legs", speeds, cpu),
                          ("TLS (nginx: client leg only)", tls_speeds, tls_cpu)):
        print(f"  {title}")
        d = med(sp["direct"])
        for name in ("direct", "nginx", "relay"):
            c = f"{med(cp[name]):.1f}" if name in cp else "-"
            print(f"    {name:28}{med(sp[name]):8.0f}{med(sp[name]) / d:9.2f}x{c:>14}")
    r, n = med(speeds["relay"]) / med(speeds["direct"]), med(cpu["relay"]) <= med(cpu["nginx"])
    tr = med(tls_speeds["relay"]) / med(tls_speeds["direct"])
    print(f"relay's plain sessions by path (relay_proxy_splices_total): kernel "
          f"{paths['kernel']:.0f}, transport {paths['transport']:.0f}")
    print(f"targets: plain >= 0.95x direct: {r:.2f}x {'PASS' if r >= 0.95 else 'MISS'}; TLS "
          f">= 0.90x: {tr:.2f}x {'PASS' if tr >= 0.9 else 'MISS'}; relay CPU <= nginx's "
          f"(plain): {'PASS' if n else 'MISS'}")
    ld, lr = med(lat["direct"]), med(lat["relay"])
    print(f"{'login+SELECT, median ms':44} relay {lr:.2f}, direct {ld:.2f} (+{lr - ld:.2f}; "
          f"p90 relay {statistics.quantiles(lat['relay'], n=10)[-1]:.2f})")
    per_session_kb = (float(held["rss_idle"]) - float(held["base"])) * 1024 / max(
        1, float(held["n_idle"]))
    print(f"relay RSS: {held['base']:.1f} MB before sessions, {held['rss_idle']:.1f} MB with "
          f"{held['n_idle']} idle ones: {per_session_kb:.1f} KB each (target <= 8) "
          f"{'PASS' if per_session_kb <= 8 and held['n_idle'] == idle_n else 'MISS'}")
    verdict = ("PASS" if held["alive"] == asked else
               "all opened held; see the RLIMIT note" if held["alive"] == total_n else "FAIL")
    print(f"sessions from one address with default limits, answering NOOP: {held['alive']} "
          f"of {total_n} ({verdict}); RSS {held['rss_total']:.1f} MB; opened in "
          f"{held['open_s']:.1f} s; errors {held['n_errors']} ({held['errors']})")


if __name__ == "__main__":
    sys.exit(main())
