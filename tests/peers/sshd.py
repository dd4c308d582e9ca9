"""A private OpenSSH sshd on loopback with key auth, its own host key and known_hosts."""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers import free_port, need, wait_for_port


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """A fresh unencrypted key pair at ``path`` / ``path.pub``."""
    subprocess.run([need("ssh-keygen"), "-q", "-t", kind, "-N", "", "-C", "relay-test",
                    "-f", str(path)], check=True)
    return path


@dataclass
class Sshd:
    dir: Path
    port: int
    user: str
    client_key: Path              # authorized for ``user``
    known_hosts: Path             # holds the server's real host key
    host_key: Path
    extra: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    def start(self) -> None:
        """Start sshd (again) on the same port and wait until it listens."""
        conf = self.dir / "sshd_config"
        conf.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {self.dir / "sshd.pid"}
AuthorizedKeysFile {self.dir / "authorized_keys"}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
AllowTcpForwarding yes
LogLevel VERBOSE
{self.extra}
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([need("sshd"), "-D", "-e", "-f", str(conf)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for_port("127.0.0.1", self.port, proc=self.proc, log=self.log)

    def stop(self) -> None:
        """Stop sshd and the session processes it forked, like a bastion reboot does.

        sshd's per-connection children call setsid(), so they are found by parentage.
        """
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        children = _descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=10)


def _descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (read from /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


@contextlib.contextmanager
def sshd(tmp: Path, *, extra: str = "") -> Iterator[Sshd]:
    """Run a private sshd; ``extra`` is appended to its sshd_config."""
    tmp.mkdir(parents=True, exist_ok=True)
    host_key = keygen(tmp / "host_key")
    client_key = keygen(tmp / "client_key")
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    port = free_port()
    pub = (tmp / "host_key.pub").read_text().split()
    known = tmp / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    server = Sshd(tmp, port, getpass.getuser(), client_key, known, host_key, extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()
