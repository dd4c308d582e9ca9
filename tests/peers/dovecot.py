"""A private Dovecot (IMAP and POP3, plain and TLS, XOAUTH2) on loopback with test mailboxes."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.peers import free_port, need, refuse_in_fast_lane, running, wait_for_port

MAIL_UID = pwd.getpwnam("nobody").pw_uid
MAIL_GID = pwd.getpwnam("nobody").pw_gid


@dataclass(frozen=True)
class Dovecot:
    root: Path
    imap: int                  # plain IMAP (STARTTLS offered)
    imaps: int                 # implicit TLS IMAP
    pop3: int                  # plain POP3 (STLS offered)
    pop3s: int                 # implicit TLS POP3
    ca: trustme.CA             # signs the server certificate (names: localhost, 127.0.0.1)
    ca_file: Path
    users: dict[str, str]
    log: Path

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user / "Maildir"

    def deliver(self, user: str, message: bytes) -> Path:
        """Drop a message into the user's INBOX the way an MDA does (tmp/ then new/)."""
        md = self.maildir(user)
        for path in (md.parent, md, md / "tmp", md / "new", md / "cur"):
            if not path.exists():
                path.mkdir()
                os.chown(path, MAIL_UID, MAIL_GID)
        name = f"{time.time():.6f}.{uuid.uuid4().hex}.relaytest"
        tmp = md / "tmp" / name
        tmp.write_bytes(message)
        os.chown(tmp, MAIL_UID, MAIL_GID)
        final = md / "new" / name
        os.rename(tmp, final)
        return final

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _oauth2(root: Path, introspection_url: str | None) -> str:
    """An ``oauth2`` passdb asking ``introspection_url`` (RFC 7662 POST) about each token."""
    if introspection_url is None:
        return ""
    (root / "dovecot-oauth2.conf.ext").write_text(f"""\
introspection_mode = post
introspection_url = {introspection_url}
username_attribute = username
active_attribute = active
active_value = true
""")
    return f"""\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/dovecot-oauth2.conf.ext
}}
"""


def _config(root: Path, ports: dict[str, int], cert: Path, key: Path, max_sessions: int,
            introspection_url: str | None = None) -> str:
    procs = max(4, max_sessions // 500 + 2)
    per_proc = max(10, max_sessions // (procs - 2) + 10)
    return _oauth2(root, introspection_url) + f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
auth_failure_delay = 0
mail_location = maildir:~/Maildir
mail_fsync = never
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_GID} home={root}/mail/%u
}}
default_client_limit = {max_sessions + 1000}
default_process_limit = {max(100, procs * 2)}
default_vsz_limit = 1G
service imap-login {{
  inet_listener imap {{
    port = {ports['imap']}
  }}
  inet_listener imaps {{
    port = {ports['imaps']}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
  client_limit = {max_sessions + 100}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {ports['pop3']}
  }}
  inet_listener pop3s {{
    port = {ports['pop3s']}
    ssl = yes
  }}
  service_count = 0
  client_limit = {max_sessions + 100}
}}
service imap {{
  service_count = 0
  process_limit = {procs}
  client_limit = {per_proc}
}}
service pop3 {{
  service_count = 0
  process_limit = {procs}
  client_limit = {per_proc}
}}
service anvil {{
  client_limit = {max_sessions * 2 + 1000}
}}
service auth {{
  client_limit = {max_sessions * 2 + 1000}
}}
protocol imap {{
  mail_max_userip_connections = {max_sessions + 100}
}}
protocol pop3 {{
  mail_max_userip_connections = {max_sessions + 100}
}}
"""


@contextlib.contextmanager
def dovecot(*, users: dict[str, str] | None = None, max_sessions: int = 200,
            introspection_url: str | None = None, tls: bool = True) -> Iterator[Dovecot]:
    """Run Dovecot until the block ends, from a private directory under /tmp.

    ``users`` maps user names to passwords (XOAUTH2 bearer tokens are checked like
    passwords). With ``introspection_url`` an ``oauth2`` passdb validates XOAUTH2 and
    OAUTHBEARER tokens against that endpoint first. With ``tls=False`` Dovecot has no TLS
    at all: the plain ports offer no STARTTLS/STLS and ``imaps``/``pop3s`` are 0. The
    directory is world-traversable because Dovecot's mail processes run as ``nobody``;
    pytest's temporary directories are not.
    """
    binary = need("dovecot")
    users = users or {"alice": "alice-pw"}
    root = Path(tempfile.mkdtemp(prefix="relay-dovecot-"))
    try:
        root.chmod(0o755)
        ca = trustme.CA()
        server = ca.issue_cert("localhost", "127.0.0.1")
        cert, key, ca_file = root / "cert.pem", root / "key.pem", root / "ca.pem"
        server.cert_chain_pems[0].write_to_path(str(cert))
        for extra in server.cert_chain_pems[1:]:
            with open(cert, "ab") as f:
                f.write(extra.bytes())
        server.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_file))
        (root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n"
                                             for u, p in users.items()))
        mail = root / "mail"
        mail.mkdir()
        os.chown(mail, MAIL_UID, MAIL_GID)
        for user in users:
            for sub in ("", "/Maildir", "/Maildir/new", "/Maildir/cur", "/Maildir/tmp"):
                path = Path(f"{mail}/{user}{sub}")
                path.mkdir(exist_ok=True)
                os.chown(path, MAIL_UID, MAIL_GID)
        ports = {name: free_port() if tls or not name.endswith("s") else 0
                 for name in ("imap", "imaps", "pop3", "pop3s")}
        text = _config(root, ports, cert, key, max_sessions, introspection_url)
        if not tls:
            text = text.replace(f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n",
                                "ssl = no\n").replace("    ssl = yes\n", "")
        conf = root / "dovecot.conf"
        conf.write_text(text)
        log = root / "dovecot.log"
        with running([binary, "-F", "-c", str(conf)], log=root / "dovecot.out") as proc:
            for port in ports.values():
                if port:
                    wait_for_port("127.0.0.1", port, proc=proc, log=root / "dovecot.out")
            yield Dovecot(root=root, ca=ca, ca_file=ca_file, users=users, log=log, **ports)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Introspection:
    """A local RFC 7662 token introspection endpoint: ``tokens`` maps token → user."""

    port: int
    tokens: dict[str, str]
    requests: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/introspect"


@contextlib.contextmanager
def introspection_server(tokens: dict[str, str]) -> Iterator[Introspection]:
    """Answer ``{"active": true, "username": U}`` for known tokens, ``active: false`` else."""
    refuse_in_fast_lane("an introspection server on loopback")
    import http.server
    import json
    import threading
    import urllib.parse

    state = Introspection(port=0, tokens=tokens, requests=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            token = urllib.parse.parse_qs(body.decode()).get("token", [""])[0]
            state.requests.append(token)
            user = state.tokens.get(token)
            answer = {"active": True, "username": user} if user else {"active": False}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def imap_greets(port: int) -> bool:
    """True when an IMAP server on ``port`` sends its greeting (a readiness probe)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(100).startswith(b"* OK")
