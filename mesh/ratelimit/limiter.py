"""Token buckets in Redis, shared by every gateway replica.

Each bucket is one key holding its *theoretical arrival time* (GCRA, the token bucket kept as
one number): with ``I`` = 1/rate and capacity ``burst * I``, a take of ``cost`` at time
``now`` moves it to ``max(tat, now) + cost * I`` and is allowed if that is at most
``now + burst * I``; otherwise the sender may retry once the excess has drained. The key
expires when the bucket would be full again, so an idle bucket costs nothing and a missing
key is a full bucket. Keys (``<ns>`` the mesh namespace)::

    <ns>:ratelimit:<limit>:<principal>   a limit's bucket for one principal
    <ns>:ratelimit:<limit>               a ``shared`` limit's one bucket

**Decisions are exact, and batched.** Every decision is made inside one Lua script, on
Redis's clock (``TIME`` in the script, so replicas on hosts whose clocks disagree agree), and
against the bucket's stored value: no replica holds a local allowance, so all replicas
together admit at most ``burst + rate * elapsed`` per bucket, with no tolerance beyond float
rounding (well under a microsecond per take). What keeps this cheap is batching: the
decisions asked for while a script call is out go together in the next call, one round trip
and one script run for all of them, evaluated in the order they were asked (so one batch
decides exactly as that many calls in a row would). An idle gateway sends a decision at once;
a busy one sends a batch per round trip. Time counts from when the script runs, a round trip
or two after the message was taken up.

**Order.** Answers come back in the order asked, so the relay's handlers resume in delivery
order and keep each sender's order per replica. A message no limit applies to passes at once
only when no decision is outstanding; otherwise it waits its turn behind them (without a
round trip of its own).

Redis unreachable (or answering with an error): ``RateLimitUnavailable``, for every decision
of the batch; nothing passes unlimited. A Redis that restarts empty has every bucket full.
The script computes no keys of its own, but a batch names many: one Redis, not a Cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis.asyncio as aioredis

from mesh.membership import REDIS_DOWN
from mesh.policy.model import EVERYONE, LimitSpec
from mesh.topology import matches

MAX_BATCH = 1024
"""Decisions sent in one script call at most (the relays' windows hold 512 each)."""

MATCH_CACHE = 65_536
"""Which buckets apply, kept per (principal, roles, topic)."""

# KEYS: the batch's buckets.  ARGV[1]: their number B; then each bucket's interval and
# capacity (µs); then each decision: cost, its bucket count n, its n bucket indexes.
# Returns, per decision, two integers: 0 and 0 when allowed, else the position (1-based)
# among its buckets of the one that must drain longest, and that wait in µs.
# A decision takes from all its buckets or from none.  Stored times are written with 17
# digits: Redis turns a Lua number into text with 14, which would round them off.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nb = tonumber(ARGV[1])
local tat, interval, capacity, touched, out = {}, {}, {}, {}, {}
for b = 1, nb do
  local stored = redis.call('GET', KEYS[b])
  tat[b] = math.max(stored and tonumber(stored) or 0, now)
  interval[b] = tonumber(ARGV[2 * b])
  capacity[b] = tonumber(ARGV[2 * b + 1])
end
local i = 2 + 2 * nb
while i <= #ARGV do
  local cost, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local worst, wait = 0, 0
  for j = 1, n do
    local b = tonumber(ARGV[i + 1 + j])
    local over = tat[b] + cost * interval[b] - capacity[b] - now
    if over > wait then worst, wait = j, over end
  end
  if worst == 0 then
    for j = 1, n do
      local b = tonumber(ARGV[i + 1 + j])
      tat[b] = tat[b] + cost * interval[b]
      touched[b] = true
    end
  end
  out[#out + 1] = worst
  out[#out + 1] = math.ceil(wait)
  i = i + 2 + n
end
for b in pairs(touched) do
  redis.call('SET', KEYS[b], string.format('%.17g', tat[b]),
             'PX', math.ceil((tat[b] - now) / 1000))
end
return out
"""


class RateLimitUnavailable(Exception):
    """Redis could not decide (unreachable, or it answered with an error): the message may
    neither pass unlimited nor be refused as over a limit; stop taking messages."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision: ``allowed``, or refused by ``limit_name``, which has room again after
    ``retry_after_s`` (if nobody else takes it meanwhile)."""

    allowed: bool
    limit_name: str | None = None
    retry_after_s: float = 0.0


ALLOWED = Verdict(True)


@dataclass(frozen=True, slots=True)
class _Bucket:
    key: str
    limit: str
    burst: int
    interval_us: float
    capacity_us: float


@dataclass(frozen=True, slots=True)
class _Decision:
    buckets: tuple[_Bucket, ...]
    cost: int
    future: asyncio.Future[Verdict]


class RateLimiter:
    """Decides, for every gateway replica alike, whether a principal may publish on a topic
    now: ``await take(principal, roles, topic)``.

    ``limits`` maps each limit's name to its spec.  ``roles`` are the principal's roles (a
    limit may name them); ``topic`` is an event's topic.  Raises ``RateLimitUnavailable``
    when Redis cannot decide, ``ValueError`` for a cost below 1 or above a limit's burst
    (it could never pass).
    """

    def __init__(
        self, redis: aioredis.Redis, namespace: str, limits: Mapping[str, LimitSpec]
    ) -> None:
        self.limits = dict(limits)
        self._prefix = f"{namespace}:ratelimit:"
        self._script = redis.register_script(_TAKE)
        self._who = {name: frozenset(spec.who) for name, spec in self.limits.items()}
        self._pending: list[_Decision] = []
        self._outstanding = 0
        """Decisions asked for whose askers have not resumed yet."""
        self._sender: asyncio.Task[None] | None = None
        self._applicable = lru_cache(maxsize=MATCH_CACHE)(self._applicable_uncached)

    def key(self, limit: str, principal: str) -> str:
        """The Redis key of ``limit``'s bucket for ``principal``."""
        if self.limits[limit].shared:
            return f"{self._prefix}{limit}"
        return f"{self._prefix}{limit}:{principal}"

    async def take(
        self, principal: str, roles: Iterable[str], topic: str, cost: int = 1
    ) -> Verdict:
        if cost < 1:
            raise ValueError(f"cost {cost} must be at least 1")
        buckets = self._applicable(principal, tuple(roles), topic)
        for bucket in buckets:
            if cost > bucket.burst:
                raise ValueError(
                    f"cost {cost} exceeds the burst of limit {bucket.limit!r} "
                    f"({bucket.burst}): it could never pass"
                )
        if not buckets and not self._outstanding:
            return ALLOWED
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Verdict] = loop.create_future()
        self._pending.append(_Decision(buckets, cost, future))
        self._outstanding += 1
        if self._sender is None:
            self._sender = loop.create_task(self._send(), name="rate-limit")
        try:
            return await future
        finally:
            self._outstanding -= 1

    def _applicable_uncached(
        self, principal: str, roles: tuple[str, ...], topic: str
    ) -> tuple[_Bucket, ...]:
        names = {principal, *roles, EVERYONE}
        out = []
        for name, spec in self.limits.items():
            if self._who[name].isdisjoint(names):
                continue
            if not any(matches(pattern, topic) for pattern in spec.topics):
                continue
            interval_us = 1_000_000 / spec.per_second
            out.append(
                _Bucket(
                    key=self.key(name, principal),
                    limit=name,
                    burst=spec.capacity,
                    interval_us=interval_us,
                    capacity_us=spec.capacity * interval_us,
                )
            )
        return tuple(out)

    async def _send(self) -> None:
        batch: list[_Decision] = []
        try:
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                try:
                    verdicts = await self._decide(batch)
                except Exception as exc:
                    failure = exc
                    if isinstance(exc, REDIS_DOWN):
                        failure = RateLimitUnavailable(
                            f"rate limits unavailable (Redis: {type(exc).__name__}: {exc})"
                        )
                        failure.__cause__ = exc
                    for decision in batch:
                        if decision.future.done():  # its asker was cancelled
                            continue
                        if decision.buckets:
                            decision.future.set_exception(failure)
                        else:  # it only waited its turn
                            decision.future.set_result(ALLOWED)
                else:
                    for decision, verdict in zip(batch, verdicts, strict=True):
                        if not decision.future.done():
                            decision.future.set_result(verdict)
                batch = []
        finally:
            self._sender = None
            # Cancelled (the loop is closing): nobody waits forever for an answer.
            for decision in (*batch, *self._pending):
                decision.future.cancel()
            self._pending = []

    async def _decide(self, batch: list[_Decision]) -> list[Verdict]:
        """One script call for the whole batch (none if no decision in it has a bucket)."""
        if not any(decision.buckets for decision in batch):
            return [ALLOWED] * len(batch)
        index: dict[str, int] = {}
        params: list[Any] = []
        steps: list[Any] = []
        for decision in batch:
            steps += (decision.cost, len(decision.buckets))
            for bucket in decision.buckets:
                position = index.get(bucket.key)
                if position is None:
                    position = index[bucket.key] = len(index) + 1
                    params += (bucket.interval_us, bucket.capacity_us)
                steps.append(position)
        answer = await self._script(keys=list(index), args=[len(index), *params, *steps])
        verdicts = []
        for n, decision in enumerate(batch):
            worst, wait_us = int(answer[2 * n]), int(answer[2 * n + 1])
            if worst == 0:
                verdicts.append(ALLOWED)
            else:
                limit = decision.buckets[worst - 1].limit
                verdicts.append(Verdict(False, limit, wait_us / 1_000_000))
        return verdicts
