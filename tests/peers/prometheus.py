"""A private Prometheus server and promtool, run by tests against relay's metrics endpoint."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.peers import free_port, need, running, wait_for_port


def promtool(*args: str, stdin: bytes | None = None,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``promtool ARGS`` and return its result (text output, never raising on exit code)."""
    proc = subprocess.run([need("promtool"), *args], input=stdin, capture_output=True,
                          timeout=timeout, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def check_metrics(exposition: bytes) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on an exposition: exit 0 means no errors or lint warnings."""
    return promtool("check", "metrics", stdin=exposition)


class Prometheus:
    """A running private Prometheus and a small client for its HTTP API."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
            doc = json.loads(resp.read())
        if doc.get("status") != "success":
            raise RuntimeError(f"Prometheus API {path} failed: {doc}")
        return doc["data"]

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets", state="active")["activeTargets"])

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def wait_for(self, what: str, cond: Any, *, timeout: float = 30.0) -> Any:
        """Poll ``cond()`` until it returns something truthy (bounded); return it."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = cond()
            if last:
                return last
            time.sleep(0.2)
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        raise TimeoutError(f"Prometheus: {what} not seen within {timeout}s "
                           f"(last: {last!r})\n{tail}")


@contextlib.contextmanager
def prometheus_server(workdir: Path, targets: Sequence[str], *, job: str = "relay",
                      rule_files: Sequence[Path] = (),
                      scrape_interval: str = "1s") -> Iterator[Prometheus]:
    """Run Debian's ``prometheus`` scraping ``targets`` (host:port) every ``scrape_interval``."""
    binary = need("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    rules = "".join(f"  - {json.dumps(str(p))}\n" for p in rule_files)
    config.write_text(
        "global:\n"
        f"  scrape_interval: {scrape_interval}\n"
        f"  evaluation_interval: {scrape_interval}\n"
        + (f"rule_files:\n{rules}" if rules else "")
        + "scrape_configs:\n"
        f"  - job_name: {json.dumps(job)}\n"
        "    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: {json.dumps(list(targets))}\n")
    port = free_port()
    log = workdir / "prometheus.log"
    argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
            "--log.level=info"]
    with running(argv, log=log, cwd=workdir) as proc:
        wait_for_port("127.0.0.1", port, proc=proc, log=log, timeout=60)
        server = Prometheus(f"http://127.0.0.1:{port}", log)
        server.wait_for("readiness", lambda: _ready(server.url), timeout=60)
        yield server


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
            return int(resp.status) == 200
    except OSError:
        return False
