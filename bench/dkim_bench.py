"""DKIM signing speed: relay's signer vs plain dkimpy, 4 KB and 100 KB messages, one core.

relay canonicalises and hashes with ``relay.dkim.canon`` (bytes operations) and signs
with ``cryptography`` (OpenSSL); plain ``dkim.sign`` does all of it in pure Python. Both
sign the same message with the same RSA-2048 key, relaxed/relaxed; every relay signature
is checked once with dkimpy first. CPU milliseconds per signature (``time.process_time``)
are printed next to the rate, as they are steadier than the rate on a busy machine.

    python bench/dkim_bench.py              # 3,000 relay signatures, 200 dkimpy ones
    python bench/dkim_bench.py --quick      # a smoke run

The target (issue 3) is at least 1,500 RSA-2048 signatures/s for relay on one core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dkim

from relay.dkim.keys import DkimKey, DkimKeys, generate, private_pem
from relay.dkim.sign import Signer

TARGET = 1500.0


def message(size: int = 4096) -> bytes:
    head = (b"From: Support <support@example.com>\r\nTo: customer@example.net\r\n"
            b"Subject: Your order has shipped\r\nDate: Sat, 21 Nov 2026 09:00:00 +0000\r\n"
            b"Message-ID: <bench@example.com>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again.  \r\n"
    body = (line * (size // len(line) + 1))[:size - len(head) - 2] + b"\r\n"
    return head + body


def rate(fn: Callable[[], object], n: int, max_seconds: float) -> tuple[float, int, float]:
    """Signatures per second, how many were made, and CPU milliseconds per signature."""
    fn()                                            # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    done = 0
    while done < n and time.perf_counter() - start < max_seconds:
        fn()
        done += 1
    return (done / (time.perf_counter() - start), done,
            (time.process_time() - cpu) * 1000 / max(done, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, default=3000, help="relay signatures (bounded)")
    ap.add_argument("--dkimpy-n", type=int, default=200, help="dkimpy signatures (bounded)")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: first)")
    args = ap.parse_args()
    n, pn = (300, 20) if args.quick else (args.n, args.dkimpy_n)
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {args.cpu if args.cpu is not None else cpus[0]})

    msg = message()
    rsa = DkimKey("example.com", "bench", "rsa-sha256", generate("rsa", 2048))
    ed = DkimKey("example.com", "benched", "ed25519-sha256", generate("ed25519"))
    record = rsa.record().encode()
    relay_rsa = Signer(DkimKeys([rsa]))
    relay_ed = Signer(DkimKeys([ed]))
    signed = relay_rsa.sign(msg, sender_domain="example.com")
    if not dkim.verify(signed, dnsfunc=lambda name, timeout=5: record):
        print("relay's signature does not verify with dkimpy", file=sys.stderr)
        return 1
    pem = private_pem(rsa.private)
    include = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
               b"content-type"]

    def plain_dkimpy() -> bytes:
        sig: bytes = dkim.sign(msg, b"bench", b"example.com", pem,
                               canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
        return sig

    big = message(100 * 1024)

    def plain_dkimpy_big() -> bytes:
        sig: bytes = dkim.sign(big, b"bench", b"example.com", pem,
                               canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
        return sig

    rows = [
        ("relay  rsa-sha256 (2048)", *rate(lambda: relay_rsa.sign(
            msg, sender_domain="example.com"), n, 30.0)),
        ("dkimpy rsa-sha256 (2048)", *rate(plain_dkimpy, pn, 30.0)),
        ("relay  ed25519-sha256", *rate(lambda: relay_ed.sign(
            msg, sender_domain="example.com"), n, 30.0)),
        ("relay  rsa-sha256, 100 KB", *rate(lambda: relay_rsa.sign(
            big, sender_domain="example.com"), n, 30.0)),
        ("dkimpy rsa-sha256, 100 KB", *rate(plain_dkimpy_big, pn, 30.0)),
    ]
    print(f"DKIM signing, {len(msg)}-byte message (and {len(big)}), relaxed/relaxed, one "
          f"core (CPU {sorted(os.sched_getaffinity(0))[0]})")
    print(f"{'signer':<28}{'signatures/s':>14}{'CPU ms each':>13}{'count':>8}")
    for name, per_s, count, cpu_ms in rows:
        print(f"{name:<28}{per_s:>14,.0f}{cpu_ms:>13.3f}{count:>8}")
    speedup = rows[0][1] / rows[1][1]
    ok = rows[0][1] >= TARGET
    print(f"relay is {speedup:.1f}x dkimpy; target {TARGET:,.0f}/s: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
