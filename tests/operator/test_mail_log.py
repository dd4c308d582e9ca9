"""The mail log's lines: one per event, values quoted and escaped only where needed,
secrets blanked."""

from __future__ import annotations

import logging

import pytest

from relay.maillog import MailLog

pytestmark = pytest.mark.fast


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize(("value", "shown"), [
    ("<b@example.net>", "<b@example.net>"),                     # safe: as it is
    (0.42, "0.42"),
    ("10.20.0.5[platform]", "10.20.0.5[platform]"),
    ("250 2.0.0 OK", '"250 2.0.0 OK"'),                         # spaces: quoted
    ('say "hi"', '"say \\"hi\\""'),                             # quotes escaped
    ("a\\b", '"a\\\\b"'),                                       # backslash escaped
    ("550 bad\r\nX-Injected: 1", '"550 bad\\x0d\\x0aX-Injected: 1"'),  # one line, always
    ("\x1b[2Jcleared", '"\\x1b[2Jcleared"'),                    # no terminal escapes
    ("tab\there", '"tab\\x09here"'),
    ("pbx.example\n", '"pbx.example\\x0a"'),                 # a final newline too
    ("caf\u00e9 ok", '"caf\u00e9 ok"'),                         # printable non-ASCII kept
    ("535 AUTH PLAIN dXNlcgB1c2VyAHB3 failed", '"535 AUTH PLAIN *** failed"'),
    ("Bearer eyJhbGciOi.x.y", '"Bearer ***"'),
    ("password=hunter2", '"password=***"'),
])
def test_a_value_is_shown_safely(value: object, shown: str) -> None:
    handler = Lines()
    logger = logging.getLogger("relay.test-mail-log")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        MailLog(logger).delivered("4QbX9k2ZJ7Tq", reply=value, size=None, note="")
    finally:
        logger.removeHandler(handler)
    assert handler.lines == [f"4QbX9k2ZJ7Tq: delivered reply={shown}"]
