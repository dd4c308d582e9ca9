"""The proxy bench's contestants: relay (``relay run``, shipped defaults) and nginx's mail proxy.

relay runs as the real ``python -m relay run`` on a config that sets only what must be
set (listeners, the upstream, passthrough login): every limit, buffer and the splice
choice are relay's shipped defaults. nginx is Debian's ``nginx`` with
``libnginx-mod-mail``, one worker, 64 KB proxy buffers, and an ``auth_http`` endpoint
served by this bench that sends every login to the same Dovecot. nginx's mail proxy
cannot speak TLS to its backend, so its TLS figure has TLS on the client leg only.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing on 127.0.0.1:{port} after {timeout}s; see {log}")


def tree_cpu_ms(pid: int) -> float:
    """CPU of ``pid`` and its live children, every thread, in ms (schedstat: nanoseconds,
    where /proc/PID/stat counts 10 ms ticks, too coarse for one FETCH)."""
    total = 0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e6


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


class RelayProxy:
    """``relay run`` with a plain and an implicit-TLS IMAP listener in front of Dovecot."""

    def __init__(self, work: Path, *, imap: int, imaps: int, ca_file: Path, cert: Path,
                 on_upstream_change: str = "reconnect") -> None:
        self.dir = work / "relay"
        self.dir.mkdir()
        self.port, self.tls_port, self.metrics_port = free_port(), free_port(), free_port()
        self.config = self.dir / "relay.toml"
        self.config.write_text(f"""[relay]
hostname = "bench.localdomain"
spool = "{self.dir / 'spool'}"

[metrics]
listen = "127.0.0.1:{self.metrics_port}"

[[listener]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:{self.port}"
tls = "none"
allow_plaintext_auth = true
upstream = "dovecot"
on_upstream_change = "{on_upstream_change}"

[[listener]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:{self.tls_port}"
tls = "implicit"
cert = "{cert}"
key = "{cert}"
upstream = "dovecot-tls"
on_upstream_change = "{on_upstream_change}"

[[upstream]]
name = "dovecot"
protocol = "imap"
host = "localhost"
port = {imap}
tls = "none"
auth = "passthrough"

[[upstream]]
name = "dovecot-tls"
protocol = "imap"
host = "localhost"
port = {imaps}
tls = "implicit"
ca_file = "{ca_file}"
auth = "passthrough"
""")
        log = self.dir / "relay.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "run", "-c", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
        for port in (self.port, self.tls_port, self.metrics_port):
            wait_port(port, self.proc, log)
        self.pid = self.proc.pid
        self.settle()

    def settle(self, timeout: float = 15.0) -> None:
        """Wait until relay's processes are done starting (its SMTP listener processes
        import relay after the ports open): their start-up CPU is not the proxy's."""
        deadline = time.monotonic() + timeout
        before = tree_cpu_ms(self.pid)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = tree_cpu_ms(self.pid)
            if now - before < 5.0:
                return
            before = now

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=10).read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.match(r"(\w+)\{(.*)\} (\S+)$", line)
            if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == want:
                return float(m.group(3))
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class _Auth(http.server.BaseHTTPRequestHandler):
    upstream = 0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Auth-Status", "OK")
        self.send_header("Auth-Server", "127.0.0.1")
        self.send_header("Auth-Port", str(self.upstream))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class NginxMail:
    """nginx's IMAP proxy (plain, and TLS toward the client) in front of Dovecot's plain port."""

    def __init__(self, work: Path, *, imap: int, cert: Path, sessions: int) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        module = Path("/usr/lib/nginx/modules/ngx_mail_module.so")
        if not Path(binary).exists() or not module.exists():
            raise SystemExit("nginx's mail proxy is missing: apt-get install -y nginx "
                             "libnginx-mod-mail")
        self.dir = work / "nginx"
        self.dir.mkdir()
        handler = type("Auth", (_Auth,), {"upstream": imap})
        self.auth = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.auth.serve_forever, daemon=True).start()
        self.port, self.tls_port = free_port(), free_port()
        conf = self.dir / "nginx.conf"
        conf.write_text(f"""load_module {module};
daemon off;
worker_processes 1;
worker_rlimit_nofile {2 * sessions + 200};
pid {self.dir / 'nginx.pid'};
error_log {self.dir / 'error.log'} warn;
events {{ worker_connections {2 * sessions + 100}; }}
mail {{
    server_name localhost;
    auth_http 127.0.0.1:{self.auth.server_address[1]}/auth;
    proxy on;
    proxy_buffer 64k;
    imap_client_buffer 64k;
    proxy_timeout 1h;
    server {{ listen 127.0.0.1:{self.port}; protocol imap; }}
    server {{
        listen 127.0.0.1:{self.tls_port} ssl;
        protocol imap;
        ssl_certificate {cert};
        ssl_certificate_key {cert};
    }}
}}
""")
        log = self.dir / "nginx.out"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([binary, "-p", str(self.dir), "-c", str(conf)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        for port in (self.port, self.tls_port):
            wait_port(port, self.proc, self.dir / "error.log")
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.auth.shutdown()
