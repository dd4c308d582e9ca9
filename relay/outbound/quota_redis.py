"""Quotas shared by replicas through Redis, with a conservative local share when it is gone.

Every replica reserves each send with one server-side Lua script (redis-py's asyncio
client, EVALSHA): the script reads Redis's own clock, prunes what left each window,
checks every limit of every claim and records the send in all of them, or in none,
atomically; so the fleet as a whole never exceeds a quota. Per limit a sorted set holds
the sends (member ``ID#AMOUNT``, score the time in ms) and a counter their sum; a send
in flight is scored in the future until ``settle`` re-stamps it with the time it ended
(see ``relay.outbound.pacing``). Keys expire by themselves when a mailbox goes quiet.

Each replica also keeps its own sends in a ``LocalQuotas``. When Redis does not answer
within ``[pacing] timeout``, relay says so once in the log, sets
``relay_pacing_shared`` to 0, counts ``relay_pacing_fallbacks_total`` and goes on
delivering within a local share: each limit divided by ``[pacing] replicas``, counting
what this replica sent. The window that spans the outage is the dangerous one: the other
replicas may have used the whole quota just before Redis went away, and nobody can know.
So for quotas of up to an hour a replica first lets one window pass from the moment it
found Redis gone; longer ones (a day's recipients) count what the fleet had sent when
Redis last answered, rather than stop a mailbox for a day. Every ``retry_interval`` a
reservation tries Redis again; when it answers, the replica's sends still inside a window
are written back (idempotently: Redis may have kept them, or restarted empty) and shared
accounting resumes. The other replicas write theirs back when they next try, so for one
window plus ``retry_interval`` after it came back a replica keeps to its local share too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from relay.config.schema import PacingSection
from relay.metrics import Metrics
from relay.outbound.pacing import (
    Claim,
    Cost,
    Limit,
    LocalQuotas,
    Ticket,
    Verdict,
    edge_margin,
)

log = logging.getLogger("relay.pacing")

# A send in flight counts as made this far ahead until it settles: long enough for nearly
# every attempt, short enough that a replica killed mid-attempt does not hold a quota for
# long. An attempt that outlasts it is counted again when it settles.
LEASE_MS = 300_000
SHORT = 3600.0              # quotas up to this window wait one window when Redis goes away

# KEYS: (zset, counter) per limit. ARGV: member id, lease ms, then per limit: span ms,
# amount, need. Returns {0, now, used...} when recorded (the fleet's usage of each limit,
# this send included), else {wait ms, index of the binding limit}.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 2
local worst, which = 0, 0
for i = 1, n do
  local z, c = KEYS[2 * i - 1], KEYS[2 * i]
  local span = tonumber(ARGV[3 * i]); local amount = tonumber(ARGV[3 * i + 1])
  local need = tonumber(ARGV[3 * i + 2])
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - span)
  if #old > 0 then
    local freed = 0
    for _, m in ipairs(old) do freed = freed + tonumber(string.match(m, '#(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now - span)
    redis.call('DECRBY', c, freed)
  end
  local used = tonumber(redis.call('GET', c) or '0')
  if used > 0 and used + need > amount then
    local wait, offset = -1, 0
    while wait < 0 do
      local batch = redis.call('ZRANGE', z, offset, offset + 99, 'WITHSCORES')
      if #batch == 0 then break end
      for j = 1, #batch, 2 do
        local score = tonumber(batch[j + 1])
        if score > now then wait = math.min(1000, span); break end
        used = used - tonumber(string.match(batch[j], '#(%d+)$'))
        if used <= 0 or used + need <= amount then wait = score + span - now; break end
      end
      offset = offset + 100
    end
    if wait < 0 then wait = math.min(1000, span) end
    if wait > worst then worst, which = wait, i end
  end
end
if worst > 0 then return {worst, which} end
local lease = tonumber(ARGV[2])
local out = {0, now}
for i = 1, n do
  local z, c = KEYS[2 * i - 1], KEYS[2 * i]
  local span = tonumber(ARGV[3 * i]); local need = tonumber(ARGV[3 * i + 2])
  redis.call('ZADD', z, now + lease, ARGV[1] .. '#' .. need)
  out[i + 2] = redis.call('INCRBY', c, need)
  redis.call('PEXPIRE', z, span + lease); redis.call('PEXPIRE', c, span + lease)
end
return out
"""

# KEYS: (zset, counter) pairs; ARGV: per pair the member, its amount and span ms.
# Re-stamps sends that ended with Redis's clock (counting again one whose lease ran out).
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS / 2 do
  local z, c = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('ZADD', z, now, ARGV[3 * i - 2]) == 1 then
    redis.call('INCRBY', c, tonumber(ARGV[3 * i - 1]))
  end
  local span = tonumber(ARGV[3 * i])
  redis.call('PEXPIRE', z, span + LEASE); redis.call('PEXPIRE', c, span + LEASE)
end
return now
""".replace("LEASE", str(LEASE_MS))

# KEYS: (zset, counter) pairs; ARGV: per pair member, age ms, span ms, need. Adds the
# sends Redis does not know (it restarted, or they were made while it was unreachable).
REPLAY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = 0
for i = 1, #KEYS / 2 do
  local z, c = KEYS[2 * i - 1], KEYS[2 * i]
  local member = ARGV[4 * i - 3]; local age = tonumber(ARGV[4 * i - 2])
  local span = tonumber(ARGV[4 * i - 1]); local need = tonumber(ARGV[4 * i])
  if redis.call('ZADD', z, 'NX', now - age, member) == 1 then
    redis.call('INCRBY', c, need)
    added = added + 1
  end
  redis.call('PEXPIRE', z, span + LEASE); redis.call('PEXPIRE', c, span + LEASE)
end
return added
""".replace("LEASE", str(LEASE_MS))


def _span_ms(limit: Limit) -> int:
    return int((limit.window + edge_margin(limit.window)) * 1000)


class RedisQuotas:
    """The shared quota store (``[pacing] backend = "redis"``)."""

    def __init__(self, cfg: PacingSection, *, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 client: Any = None, lease: float = LEASE_MS / 1000) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._clock = clock
        self._local = LocalQuotas(clock=clock)
        self._me = uuid.uuid4().hex[:12]
        self._lease_ms = int(lease * 1000)
        self._seq = 0
        self._limits: dict[str, tuple[Limit, ...]] = {}     # key -> limits, for replays
        self._fleet: dict[str, tuple[float, dict[str, int]]] = {}   # key -> (when, usage)
        self._down_since: float | None = None
        self._back_since: float | None = None
        self._tried = 0.0
        tls: dict[str, Any] = {"ssl_ca_certs": str(cfg.ca_file)} if cfg.ca_file else {}
        self._client = client if client is not None else aioredis.Redis.from_url(
            cfg.redis_url, password=cfg.password.reveal() if cfg.password else None,
            socket_timeout=cfg.timeout, socket_connect_timeout=cfg.timeout,
            retry=Retry(NoBackoff(), 0), **tls)
        self._reserve = self._client.register_script(RESERVE)
        self._settle = self._client.register_script(SETTLE)
        self._replay = self._client.register_script(REPLAY)
        if metrics is not None:
            metrics.pacing_shared.set(1)

    @property
    def shared(self) -> bool:
        """False while this replica counts only its local share."""
        return self._down_since is None

    def where(self) -> str:
        """The Redis server, for log lines (never with a password: the loader refuses one
        in the url)."""
        return self._cfg.redis_url

    def _key(self, key: str, limit: Limit) -> tuple[str, str]:
        base = f"{self._cfg.key_prefix}:quota:{key}:{limit.dimension}:{int(limit.window)}"
        return base, base + ":sum"

    async def reserve(self, claims: Sequence[Claim]) -> Verdict:
        now = self._clock()
        if self._down_since is not None and now - self._tried < self._cfg.retry_interval:
            return self._local_share(claims)
        self._tried = now
        for claim in claims:
            if claim.limits:
                self._limits[claim.key] = claim.limits
        try:
            if self._down_since is not None:
                await self._catch_up()
            if self._back_since is not None:           # the others may not have caught up
                verdict = self._share(claims, self._back_since, grace=self._cfg.retry_interval)
                if verdict.wait > 0:
                    return verdict
            return await self._reserve_shared(claims)
        except (RedisError, OSError, TimeoutError) as exc:
            self._went_down(exc)
            return self._local_share(claims)

    async def _reserve_shared(self, claims: Sequence[Claim]) -> Verdict:
        keys: list[str] = []
        args: list[Any] = []
        order: list[tuple[Claim, Limit]] = []
        for claim in claims:
            for limit in claim.limits:
                keys += self._key(claim.key, limit)
                args += [_span_ms(limit), limit.amount, claim.cost.of(limit.dimension)]
                order.append((claim, limit))
        if not order:
            return Verdict(0.0, ticket=Ticket(claims=tuple(claims)))
        self._seq += 1
        ident = f"{self._me}:{self._seq}"
        async with asyncio.timeout(self._cfg.timeout):
            answer = await self._reserve(keys=keys, args=[ident, self._lease_ms, *args])
        wait_ms, which = int(answer[0]), int(answer[1])
        if wait_ms > 0:
            claim, limit = order[which - 1]
            return Verdict(wait_ms / 1000.0, limit, key=claim.key)
        now = self._clock()
        for (claim, limit), used in zip(order, answer[2:], strict=True):
            when, usage = self._fleet.get(claim.key, (now, {}))
            usage = usage if when == now else {}
            usage[limit.dimension] = max(usage.get(limit.dimension, 0), int(used))
            self._fleet[claim.key] = (now, usage)
        if len(self._fleet) > 10_000:                # bounded: forget quiet mailboxes
            horizon = max((lim.window for lims in self._limits.values() for lim in lims),
                          default=0.0)
            for key in [k for k, (t, _) in self._fleet.items() if t < now - horizon]:
                del self._fleet[key]
        ticket = self._local.record(claims, ident=ident)
        ticket.shared = ident
        return Verdict(0.0, ticket=ticket)

    def _share(self, claims: Sequence[Claim], since: float, *, grace: float = 0.0,
               wait_out: bool = False) -> Verdict:
        """How long until this fits this replica's share of each limit (0: now). With
        ``wait_out``, quotas of up to an hour also wait one window from ``since`` (the
        moment Redis went away: the others may have used it all just before). Without,
        only sends within a window (plus ``grace``) of ``since`` are checked at all."""
        replicas = self._cfg.replicas
        now = self._clock()
        mine = [Claim(c.key, tuple(lim.shared(replicas) for lim in c.limits
                                   if wait_out or now < since + lim.window + grace), c.cost)
                for c in claims]
        verdict = self._local.check(mine)
        if not wait_out:
            if all(not c.limits for c in mine):
                self._back_since = None            # the grace is over for every window
            return verdict
        for claim in claims:
            for limit in claim.limits:
                if limit.window > SHORT:
                    continue
                wait = since + limit.window + edge_margin(limit.window) - now
                if wait > verdict.wait:
                    verdict = Verdict(wait, limit, key=claim.key)
        return verdict

    def _local_share(self, claims: Sequence[Claim]) -> Verdict:
        """Reserve against this replica's share of each limit, in this process only."""
        assert self._down_since is not None
        verdict = self._share(claims, self._down_since, wait_out=True)
        if verdict.wait > 0:
            return verdict
        self._seq += 1
        ticket = self._local.record(claims, ident=f"{self._me}:{self._seq}")
        return Verdict(0.0, ticket=ticket)

    async def settle(self, ticket: Ticket) -> None:
        self._local.settle_now(ticket)
        if not ticket.shared or self._down_since is not None:
            return
        keys: list[str] = []
        args: list[Any] = []
        for claim in ticket.claims:
            for limit in claim.limits:
                need = claim.cost.of(limit.dimension)
                keys += self._key(claim.key, limit)
                args += [f"{ticket.shared}#{need}", need, _span_ms(limit)]
        if not keys:
            return
        try:
            async with asyncio.timeout(self._cfg.timeout):
                await self._settle(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._went_down(exc)

    async def _catch_up(self) -> None:
        """Redis answers again: write back this replica's sends it may not know."""
        async with asyncio.timeout(self._cfg.timeout):
            await self._client.ping()
        keys: list[str] = []
        args: list[Any] = []
        for key, age, cost, ident in self._local.entries():
            for limit in self._limits.get(key, ()):
                keys += self._key(key, limit)
                args += [f"{ident}#{cost.of(limit.dimension)}", int(age * 1000),
                         _span_ms(limit), cost.of(limit.dimension)]
        added = 0
        for start in range(0, len(keys), 200):       # bounded script calls
            async with asyncio.timeout(self._cfg.timeout):
                added += int(await self._replay(keys=keys[start:start + 200],
                                                args=args[start * 2:start * 2 + 400]))
        assert self._down_since is not None
        log.info("pacing: Redis at %s answers again after %.0f s; quotas are shared by "
                 "the replicas again (%d send(s) of this replica written back)", self.where(),
                 self._clock() - self._down_since, added)
        self._down_since = None
        self._back_since = self._clock()
        if self._metrics is not None:
            self._metrics.pacing_shared.set(1)

    def _went_down(self, exc: BaseException) -> None:
        if self._down_since is not None:
            return
        self._down_since = self._clock()
        for key, (when, usage) in self._fleet.items():    # what the fleet had sent
            self._local.assume(key, when, Cost(usage.get("messages", 0),
                                               usage.get("recipients", 0),
                                               usage.get("bytes", 0)))
        self._fleet.clear()
        share = f"1/{self._cfg.replicas}" if self._cfg.replicas > 1 else "all (replicas = 1)"
        log.warning("pacing: Redis at %s is unreachable (%s); delivering within a local "
                    "share of each quota (%s) until it answers again, tried every %g s "
                    "(hint: check the Redis server and the network; [pacing] replicas must "
                    "say how many relays share the quotas)", self.where(),
                    _describe(exc), share, self._cfg.retry_interval)
        if self._metrics is not None:
            self._metrics.pacing_shared.set(0)
            self._metrics.pacing_fallbacks.inc()

    async def close(self) -> None:
        await self._client.aclose()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
