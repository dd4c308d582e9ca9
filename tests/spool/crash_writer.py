"""Stores, updates and removes messages in a loop until killed (for test_crash).

Prints ``S <id>`` after store() returned, ``T <id>`` after save_state() returned,
``D <id>`` before remove() and ``R <id>`` after it returned. Each message's sender
carries the CRC of its bytes, so the test can check every recovered message is whole.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import zlib
from pathlib import Path

from relay.envelope import Envelope
from relay.spool.store import Spool


async def worker(spool: Spool, rng: random.Random, live: list[str]) -> None:
    while True:
        size = rng.choice((200, 1000, 5000, 60_000, 300_000))
        data = b"Subject: crash\r\n\r\n" + rng.randbytes(size).translate(None, b"\r\n")
        env = Envelope(sender=f"crc{zlib.crc32(data)}@example.com",
                       recipients=("a@example.net", "b@example.net"), received_at=time.time())
        qid = await spool.store(env, data)
        print("S", qid, flush=True)
        live.append(qid)
        roll = rng.random()
        if roll < 0.25 and live:
            target = live[rng.randrange(len(live))]
            msg = spool.load(target)
            msg.state.attempts += 1
            msg.state.recipients[0].last_reply = "451 4.3.0 later " + "x" * rng.randrange(500)
            msg.state.next_attempt = time.time() + 60
            await spool.save_state(msg)
            print("T", target, flush=True)
        elif roll < 0.85 and live:
            target = live.pop(rng.randrange(len(live)))
            print("D", target, flush=True)
            await spool.remove(target)
            print("R", target, flush=True)


async def main() -> None:
    spool = Spool(Path(sys.argv[1]))
    spool.lock()
    live = [m.queue_id for m in spool.recover()]
    rng = random.Random(int(sys.argv[2]))
    print("READY", flush=True)
    await asyncio.gather(*(worker(spool, random.Random(rng.random()), live) for _ in range(6)))


if __name__ == "__main__":
    asyncio.run(main())
