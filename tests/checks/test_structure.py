"""Message structure checks, sans-IO: bytes in, the exact reply out (or none)."""

from __future__ import annotations

import pytest

from relay.checks.structure import inspect, own_trace_end, parse_addresses
from relay.config.schema import STRUCTURE_CHECKS, STRUCTURE_LEVELS
from relay.verdict import Refusal

pytestmark = pytest.mark.fast

STRICT = STRUCTURE_LEVELS["strict"]
STANDARD = STRUCTURE_LEVELS["standard"]
HEAD = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n"
MIME = HEAD + b"MIME-Version: 1.0\r\n"
PDF = (b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
       b"JVBERi0xLjQK\r\n")

# (id, message, exact reply): every malformed kind the issue lists, and more.
BAD = [
    ("no-from", b"To: b@example.net\r\n\r\nx\r\n",
     "550 5.6.0 message has no From: header field"),
    ("no-to", b"From: a@example.com\r\n\r\nx\r\n",
     "550 5.6.0 message has no To: header field"),
    ("two-from", b"From: a@example.com\r\nFrom: c@example.com\r\nTo: b@example.net\r\n\r\nx\r\n",
     "550 5.6.0 message has 2 From: header fields; RFC 5322 allows one"),
    ("unparsable-from", b"From: Alice <alice@example.com\r\nTo: b@example.net\r\n\r\nx\r\n",
     "550 5.6.0 From: header field is not a valid address list (missing trailing '>' on "
     "angle-addr)"),
    ("from-without-domain", b"From: alice\r\nTo: b@example.net\r\n\r\nx\r\n",
     "550 5.6.0 From: header field is not a valid address list (addr-spec local part with "
     "no domain)"),
    ("from-group-only", b"From: undisclosed:;\r\nTo: b@example.net\r\n\r\nx\r\n",
     "550 5.6.0 From: header field is not a valid address list (it names no mailbox)"),
    ("two-senders", HEAD + b"Sender: a@example.com, c@example.com\r\n\r\nx\r\n",
     "550 5.6.0 Sender: header field is not a valid address list (it names more than one "
     "mailbox)"),
    ("bad-cc", HEAD + b"Cc: <b@example.net> trailing words\r\n\r\nx\r\n",
     "550 5.6.0 Cc: header field is not a valid address list (invalid address in "
     "address-list)"),
    ("no-header-section", b"\r\nbody only\r\n",
     "550 5.6.0 message has no header section (it starts with an empty line)"),
    ("empty", b"", "550 5.6.0 message is empty"),
    ("nul", HEAD + b"\r\nline one\r\nline\0two\r\n", "550 5.6.0 line 6 contains a NUL byte"),
    ("nul-in-header", b"From: a@example.com\r\nTo: b@exa\0mple.net\r\n\r\nx\r\n",
     "550 5.6.0 line 2 contains a NUL byte"),
    ("8bit-header", b"From: a@example.com\r\nTo: b@example.net\r\nSubject: caf\xc3\xa9\r\n\r\n",
     "550 5.6.7 line 3 of the header has 8-bit bytes; send the message with SMTPUTF8 or "
     "encode them (RFC 2047)"),
    ("no-colon", HEAD + b"this is not a field\r\n\r\nx\r\n",
     '550 5.6.0 line 4 is neither a header field nor the empty line that ends the header '
     '("this is not a field" has no colon)'),
    ("body-without-empty-line", HEAD + b"Hello, here is the body\r\n",
     '550 5.6.0 line 4 is neither a header field nor the empty line that ends the header '
     '("Hello, here is the body" has no colon)'),
    ("space-before-colon", b"From: a@example.com\r\nTo: b@example.net\r\nSubject : hi\r\n\r\n",
     '550 5.6.0 line 3: header field name "Subject" has a space before the colon'),
    ("8bit-field-name", HEAD + b"X-Caf\xc3\xa9: 1\r\n\r\nx\r\n",
     "550 5.6.7 line 4 of the header has 8-bit bytes; send the message with SMTPUTF8 or "
     "encode them (RFC 2047)"),
    ("starts-folded", b" folded\r\n" + HEAD + b"\r\nx\r\n",
     "550 5.6.0 line 1 is a continuation line; the header must start with a field"),
    ("multipart-no-boundary", MIME + b"Content-Type: multipart/mixed\r\n\r\nx\r\n",
     "550 5.6.0 Content-Type: multipart/mixed has no boundary parameter"),
    ("multipart-not-closed", MIME + b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
     b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n",
     '550 5.6.0 multipart/mixed body has no closing boundary "--b1--"'),
    ("nested-not-closed", MIME + b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
     b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n--b2\r\n\r\nx\r\n"
     b"--b1--\r\n",
     '550 5.6.0 part 1: multipart/alternative body has no closing boundary "--b2--"'),
    ("broken-base64-part", MIME + b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
     b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1\r\n"
     b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
     b"JVBERi0xLjQK!!!\r\n--b1--\r\n",
     "550 5.6.0 part 2 (application/pdf) is declared base64 but does not decode: Only "
     "base64 data is allowed"),
    ("truncated-base64-body", MIME + b"Content-Type: text/plain\r\n"
     b"Content-Transfer-Encoding: base64\r\n\r\nSGVsbG8gd29ybG\r\n",
     "550 5.6.0 message body (text/plain) is declared base64 but does not decode: "
     "Incorrect padding"),
    ("line-1200", HEAD + b"\r\n" + b"line\r\n" * 8 + b"x" * 1200 + b"\r\n",
     "550 5.6.0 line 13 is 1,200 octets; RFC 5322 allows 998"),
    ("line-999", HEAD + b"\r\n" + b"y" * 999 + b"\r\n",
     "550 5.6.0 line 5 is 999 octets; RFC 5322 allows 998"),
    ("header-1mb", HEAD + b"X-Big: " + b"a" * 70 + (b"\r\n " + b"a" * 70) * 14980 + b"\r\n\r\n",
     "552 5.3.4 header section is 1,093,672 bytes; this listener allows 256 KB"),
    ("two-subjects", HEAD + b"Subject: again\r\n\r\nx\r\n",
     "550 5.6.0 message has 2 Subject: header fields; RFC 5322 allows one"),
    ("two-message-ids", HEAD + b"Message-ID: <1@x>\r\nMessage-Id: <2@x>\r\n\r\nx\r\n",
     "550 5.6.0 message has 2 Message-ID: header fields; RFC 5322 allows one"),
]


@pytest.mark.parametrize(("message", "reply"), [(m, r) for _, m, r in BAD],
                         ids=[i for i, _, _ in BAD])
def test_malformed_message_gets_its_reply(message: bytes, reply: str) -> None:
    with pytest.raises(Refusal) as info:
        inspect(message, checks=STRICT)
    assert info.value.reply == reply
    assert info.value.reason == "structure"


ZENDESK_SHAPED = (
    b"From: =?UTF-8?Q?Support_J=C3=B6rg?= <support@example.com>\r\n"
    b"To: customer@example.net\r\n"
    b"Subject: =?UTF-8?Q?Lieferung_=C3=BCberf=C3=A4llig?=\r\n"
    b"Date: Sat, 21 Nov 2026 09:00:00 +0000\r\n"
    b"Message-ID: <ticket-4711-reply-3@zendesk.example>\r\n"
    b"In-Reply-To:\r\n <ticket-4711-reply-2@zendesk.example>\r\n"
    b"References: <ticket-4711@zendesk.example>\r\n <ticket-4711-reply-1@zendesk.example>\r\n"
    b"Auto-Submitted: auto-generated\r\n"
    b"X-Auto-Response-Suppress:All\r\n"
    b"X-Mailer:   Zendesk Mailer  \r\n"
    b"X-Zendesk-From-Account-Id: 1a2b3c\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="zd-1"\r\n'
    b"\r\n--zd-1\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\nHallo,\r\n"
    b"--zd-1\r\nContent-Type: text/html; charset=UTF-8\r\nContent-Transfer-Encoding: base64"
    b"\r\n\r\nPHA+SGFsbG8sPC9wPg==\r\n--zd-1--\r\n"
)
GENESYS_SHAPED = (
    b'From: "Acme Notifications" <notify@example.com>\r\n'
    b"To: Jane Doe <jane.doe@example.net>\r\n"
    b"Subject: Your appointment is confirmed\r\n"
    b"Date: Sat, 21 Nov 2026 09:00:00 +0000\r\n"
    b"Message-ID: <c0ffee@genesys.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n" + b"Your appointment is confirmed.\r\n" * 40
)
GOOD = [
    ("zendesk-shaped", ZENDESK_SHAPED),
    ("genesys-shaped", GENESYS_SHAPED),
    ("smtp-source", b"From: <bench@example.com>\r\nTo: <sink@example.net>\r\n"
     b"Date: Sun,  6 Dec 2026 07:59:55 +0000 (UTC)\r\nMessage-Id: <577e.0003.0000@vm>\r\n"
     b"\r\n" + (b"1" + b"X" * 78 + b"\r\n") * 12),
    ("headers-only", HEAD),
    ("line-998", HEAD + b"\r\n" + b"y" * 998 + b"\r\n"),
    ("obsolete-phrase-and-group", b"From: Joe Q. Public <john@example.com>\r\n"
     b"To: undisclosed-recipients:;\r\nCc: a@example.com,, b@example.com\r\n\r\n"),
    ("quoted-comma-and-comment", b'From: "Doe, Jane" <jane@example.com> (Sales)\r\n'
     b"To: b@example.net,\r\n\tc@example.net\r\n\r\nx\r\n"),
    ("empty-base64-part", MIME + b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
     b"--b1\r\n" + PDF + b"--b1\r\nContent-Transfer-Encoding: base64\r\n\r\n\r\n--b1--\r\n"),
    ("nested-multipart", MIME + b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
     b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n--b2\r\n\r\ntext\r\n"
     b"--b2--\r\n--b1 \r\n" + PDF + b"--b1--\r\nepilogue\r\n"),
]


@pytest.mark.parametrize("message", [m for _, m in GOOD], ids=[i for i, _ in GOOD])
def test_valid_message_passes(message: bytes) -> None:
    shape = inspect(message, checks=STRICT)
    assert shape.has(b"from")


def test_8bit_header_passes_with_smtputf8() -> None:
    message = (b"From: J\xc3\xb6rg <j@example.com>\r\nTo: b@example.net\r\n"
               b"Subject: caf\xc3\xa9\r\n\r\n")
    assert inspect(message, checks=STRICT, smtputf8=True).addresses[b"from"] == ["j@example.com"]


@pytest.mark.parametrize(("mid", "kind"), [(m, i) for i, m, _ in BAD
                                           if i in ("no-to", "multipart-no-boundary",
                                                    "broken-base64-part")])
def test_standard_leaves_to_and_mime_to_strict(mid: bytes, kind: str) -> None:
    inspect(mid, checks=STANDARD)                 # no To:, broken MIME: standard passes
    with pytest.raises(Refusal):
        inspect(mid, checks=STRICT)


@pytest.mark.parametrize(("kind", "message", "reply"), BAD, ids=[i for i, _, _ in BAD])
def test_off_passes_everything(kind: str, message: bytes, reply: str) -> None:
    inspect(message, checks=())


def test_each_check_can_be_named_alone() -> None:
    """A list turns on exactly the checks it names: each bad case trips only its own."""
    trips = {}
    for kind, message, _ in BAD:
        trips[kind] = [c for c in STRUCTURE_CHECKS if _refused(message, (c,))]
    assert trips["no-from"] == ["from"]
    assert trips["no-to"] == ["to"]
    assert trips["nul"] == ["nul"]
    assert trips["line-1200"] == ["line-length"]
    assert trips["header-1mb"] == ["header-size"]
    assert trips["space-before-colon"] == ["field-names"]
    assert trips["unparsable-from"] == ["addresses"]
    assert trips["two-subjects"] == ["singletons"]
    assert trips["broken-base64-part"] == ["mime"]
    assert trips["empty"] == ["header-section"]
    assert trips["8bit-header"] == ["8bit-headers"]


def _refused(message: bytes, checks: tuple[str, ...]) -> bool:
    try:
        inspect(message, checks=checks)
    except Refusal:
        return True
    return False


def test_header_size_limit_is_configurable_and_named() -> None:
    message = HEAD + b"X-Long: " + b"a" * 60 + (b"\r\n " + b"a" * 60) * 40 + b"\r\n\r\n"
    inspect(message, checks=STRICT, max_header_size=4096)
    with pytest.raises(Refusal) as info:
        inspect(message, checks=STRICT, max_header_size=2048, size_by="listener platform")
    assert info.value.reply == ("552 5.3.4 header section is 2,643 bytes; listener platform "
                                "allows 2 KB")


def test_lines_count_from_the_clients_first_line() -> None:
    received = (b"Received: from x ([127.0.0.1])\r\n\tby relay.test (relay) with ESMTP;\r\n"
                b"\tSat, 21 Nov 2026 09:00:00 +0000\r\n")
    message = received + HEAD + b"\r\nok\r\n" + b"z" * 1000 + b"\r\n"
    start = own_trace_end(message)
    assert start == len(received)
    # a client line starting with a blank is the client's, not part of relay's field
    assert own_trace_end(received + b" folded\r\n" + HEAD) == len(received)
    with pytest.raises(Refusal) as info:
        inspect(message, start=start, checks=STRICT)
    assert info.value.text == "line 6 is 1,000 octets; RFC 5322 allows 998"


@pytest.mark.parametrize(("value", "addresses"), [
    ("a@example.com", ["a@example.com"]),
    ("Alice <a@example.com>, \"Bob, Jr\" <b@example.org>", ["a@example.com", "b@example.org"]),
    ("=?utf-8?q?J=C3=B6rg?= <j@example.com>", ["j@example.com"]),
    ("(comment) a@example.com", ["a@example.com"]),
    ("team: a@example.com, b@example.com;", ["a@example.com", "b@example.com"]),
])
def test_parse_addresses(value: str, addresses: list[str]) -> None:
    assert parse_addresses(value) == (addresses, None)


@pytest.mark.parametrize("value", ["alice@", "a@@example.com", "<a@b.c", "just text"])
def test_parse_addresses_problems(value: str) -> None:
    found, problem = parse_addresses(value)
    assert problem and found == []
