"""A reload that changes an upstream tries its deferred mail now (the real relay process)."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.peers import free_port, wait_until
from tests.peers.relayproc import Relay, Sink, config, send


def test_a_reload_that_changes_the_upstream_tries_its_deferred_mail_now(
        tmp_path: Path) -> None:
    dead = free_port()
    listen = free_port()
    sink = Sink(tmp_path).start()
    relay = Relay(tmp_path, config(spool=tmp_path / "spool", listen=listen, sink=dead,
                                   retry_first="1h", retry_max="1h"))
    try:
        relay.start(listen)
        qid = send(listen, subject="waiting")
        relay.wait_log(f"{qid}: deferred")
        # a reload that does not change the way to the provider leaves it to its backoff
        relay.config.write_text(relay.config.read_text().replace(
            'connect_timeout = "5s"', 'connect_timeout = "6s"'))
        relay.signal(signal.SIGHUP)
        relay.wait_log("reload: config", count=1)
        assert "deferred message(s) for it are due now" not in relay.log_text()
        assert sink.messages() == []
        # the operator fixes the port: the deferred message goes now, not in an hour
        relay.config.write_text(relay.config.read_text().replace(f"port = {dead}",
                                                                 f"port = {sink.port}"))
        relay.signal(signal.SIGHUP)
        relay.wait_log("reload: config", count=2)
        relay.wait_log("sink changed: 1 deferred message")
        wait_until(lambda: len(sink.messages()) == 1, timeout=20)
        relay.wait_log(f"{qid}: delivered")
        # where quotas are kept changes only with a restart: said, and the old one kept
        relay.config.write_text(relay.config.read_text() + "\n[pacing]\nreplicas = 2\n")
        relay.signal(signal.SIGHUP)
        relay.wait_log(r"reload failed, still running the previous config: \[pacing\] "
                       "cannot change on reload")
    finally:
        relay.stop()
        sink.stop()
