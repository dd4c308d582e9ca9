"""The real `relay run`: malformed mail is refused in the session and never relayed; valid
Zendesk- and Genesys-shaped mail reaches the provider (smtp-sink) with its protected
headers byte for byte; each refusal is one log line and one metric increment."""

from __future__ import annotations

from pathlib import Path

from relay.headers import protected_lines
from tests.checks.test_structure import BAD, GENESYS_SHAPED, ZENDESK_SHAPED
from tests.peers import free_port, wait_until
from tests.peers.relayproc import Sink, config, running_relay, sample, scrape
from tests.smtp.test_structure import transact


def test_malformed_refused_valid_relayed_byte_for_byte(tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    port, metrics = free_port(), free_port()
    spool = tmp_path / "spool"
    conf = config(spool=spool, listen=port, sink=sink.port, metrics=metrics,
                  listener_extra='structure_checks = "strict"\n')
    try:
        with running_relay(tmp_path, conf, port, metrics) as relay:
            for kind, message, reply in BAD:
                assert transact(port, message) == reply, kind
            assert [p for p in (spool / "queue").iterdir()] == []
            text = relay.log_text()
            assert text.count("NOQUEUE: rejected client=127.0.0.1[platform] stage=DATA "
                              "reason=structure") == len(BAD)
            assert sample(scrape(metrics), "relay_messages_refused_total",
                          listener="platform", reason="structure") == len(BAD)
            for message in (ZENDESK_SHAPED, GENESYS_SHAPED):
                assert transact(port, message).startswith("250 2.0.0 Ok: queued as ")
            relay.wait_log(r"delivered to=", count=2, timeout=60)
        got = sink.messages()
        assert len(got) == 2                     # nothing malformed was ever relayed
        for message in (ZENDESK_SHAPED, GENESYS_SHAPED):
            lf = message.replace(b"\r\n", b"\n")   # smtp-sink dumps with LF line ends
            [dump] = [m for m in got if lf in m]      # (and one more LF at the end)
            assert protected_lines(dump) == protected_lines(lf)
            assert protected_lines(dump)           # Message-ID, References... are there
        wait_until(lambda: not list((spool / "queue").iterdir()))
    finally:
        sink.stop()
