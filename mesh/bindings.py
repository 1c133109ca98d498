"""Queue bindings that follow the code: reconciled at start against a ledger in Redis.

A queue keeps a binding until someone unbinds it, so a pattern renamed or dropped in the code kept
delivering to the old key. At start, ``reconcile`` binds what the code declares and unbinds what
the previous start recorded but the code no longer declares. AMQP cannot list a queue's bindings
(only the management API can, and agents will not have its rights), so each queue's last declared
bindings are kept in Redis.

Layout: ``<namespace>:bindings:<queue>``, a set with one member per binding, the JSON array
``[exchange, routing_key]``. No key means nothing recorded. RabbitMQ (3.10.8 tested) answers
``queue.unbind`` of a binding, or an exchange, that does not exist with ``unbind-ok``, so a
binding already removed by hand costs nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from aio_pika.abc import AbstractQueue

from mesh import topology
from mesh.membership import REDIS_DOWN

__all__ = ["Binding", "BindingLedger", "reconcile"]

logger = logging.getLogger(__name__)

_ATTEMPTS = 16
"""How many times ``reconcile`` starts over because another start of the queue recorded first.

Each conflict means some other start succeeded, so N replicas starting at once need at most N."""


class Binding(NamedTuple):
    """A queue's binding: messages on ``exchange`` whose key matches ``routing_key``."""

    exchange: str
    routing_key: str


def _encode(binding: Binding) -> str:
    return json.dumps([binding.exchange, binding.routing_key], separators=(",", ":"))


def _decode(members: Iterable[bytes | str]) -> set[Binding]:
    found = set()
    for member in members:
        try:
            exchange, routing_key = json.loads(member)
            found.add(Binding(str(exchange), str(routing_key)))
        except (ValueError, TypeError):
            # Not written by this module; unbinding a guess could cut a live route.
            logger.warning("ignoring a malformed binding record %r", member)
    return found


def _replace(pipe: Any, key: str, bindings: Iterable[Binding], expires: float | None) -> None:
    """Queue the commands that make ``key`` hold exactly ``bindings`` (none: no key)."""
    pipe.delete(key)
    members = sorted(_encode(b) for b in bindings)
    if members:
        pipe.sadd(key, *members)
        if expires is not None:
            pipe.pexpire(key, max(1, round(expires * 1000)))


class _LedgerDown(Exception):
    """Redis failed during ``reconcile`` (the redis-py or socket error is the cause)."""


# Replaces a record only if it still holds exactly what was read (compared as a set), so a
# start that read, bound and unbound before another start recorded starts over. One round trip
# on any pooled connection: a WATCH would hold a connection of its own across the broker's
# binds, one per behaviour starting at once, and cost two more round trips.
_REPLACE_IF_UNCHANGED = """
local read = tonumber(ARGV[1])
if redis.call('SCARD', KEYS[1]) ~= read then return 0 end
for i = 2, read + 1 do
    if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then return 0 end
end
local ttl = tonumber(ARGV[read + 2])
redis.call('DEL', KEYS[1])
if #ARGV > read + 2 then
    redis.call('SADD', KEYS[1], unpack(ARGV, read + 3))
    if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
end
return 1
"""


class BindingLedger:
    """The bindings each queue was last declared with, one Redis set per queue."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self._replace_if_unchanged = redis.register_script(_REPLACE_IF_UNCHANGED)

    def key(self, queue: str) -> str:
        """The Redis key of ``queue``'s record."""
        return f"{self.namespace}:bindings:{queue}"

    async def recorded(self, queue: str) -> set[Binding]:
        """The bindings last recorded for ``queue`` (empty if none)."""
        return _decode(await self.redis.smembers(self.key(queue)))

    async def record(
        self, queue: str, bindings: Iterable[Binding], *, expires: float | None = None
    ) -> None:
        """Replace ``queue``'s record with ``bindings``, atomically (MULTI/EXEC).

        ``expires``: seconds until Redis drops the record, counted from this write; for queues
        that do not outlive their instance. None keeps it until replaced.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            _replace(pipe, self.key(queue), bindings, expires)
            await pipe.execute()

    async def forget(self, queue: str) -> None:
        """Drop ``queue``'s record (the queue is gone)."""
        await self.redis.unlink(self.key(queue))

    async def _read(self, queue: str) -> tuple[list[bytes | str], set[Binding]]:
        """``queue``'s record as stored (for ``_replace_if``) and decoded."""
        try:
            members = list(await self.redis.smembers(self.key(queue)))
        except REDIS_DOWN as exc:
            raise _LedgerDown(str(exc)) from exc
        return members, _decode(members)

    async def _replace_if(
        self,
        queue: str,
        read: list[bytes | str],
        bindings: Iterable[Binding],
        expires: float | None,
    ) -> bool:
        """Record ``bindings`` if the record still holds ``read``; else False, nothing written."""
        ttl = 0 if expires is None else max(1, round(expires * 1000))
        members = sorted(_encode(b) for b in bindings)
        try:
            replaced = await self._replace_if_unchanged(
                keys=[self.key(queue)], args=[len(read), *read, ttl, *members]
            )
        except REDIS_DOWN as exc:
            raise _LedgerDown(str(exc)) from exc
        return bool(replaced)


async def _bind(queue: AbstractQueue, bindings: list[Binding]) -> None:
    for binding in bindings:
        await queue.bind(binding.exchange, binding.routing_key)


async def reconcile(
    queue: AbstractQueue,
    declared: Iterable[Binding],
    ledger: BindingLedger,
    *,
    expires: float | None = None,
) -> set[Binding]:
    """Bind ``declared``, unbind what ``ledger`` recorded beyond it, record it; return the latter.

    Binding does not depend on Redis: if Redis is down the queue is still bound as declared and
    the start goes on, leaving stale bindings (none can be known) with a warning. Bindings made
    then are not recorded: should the next start's code no longer declare them, they stay.
    ``expires`` is passed to ``BindingLedger.record``.
    """
    wanted = sorted(set(declared))
    removed: set[Binding] = set()
    # Replicas share the queue, so two versions of the code may start at once during a rollout.
    # The last writer wins: the queue ends up bound exactly as the code of the start that
    # recorded last declares, and the ledger says so; the other version's own bindings are gone
    # (its messages no longer reach the queue) until one of its replicas starts again, and the
    # last version's messages that the other version's replicas take find no handler there and
    # are dead-lettered. "Exactly" (once every start got to record) needs the compare: without it
    # two starts reading the same record could each leave the other's bindings on the broker,
    # unrecorded for good. Each attempt binds and unbinds after its read and records only if the
    # record still holds what it read, so when another start recorded in between, this one
    # starts over from that record. (A record changed and changed back in between is safe too:
    # whoever wrote it back bound its bindings after reading the change.)
    try:
        for _ in range(_ATTEMPTS):
            read, recorded = await ledger._read(queue.name)
            await _bind(queue, wanted)
            stale = recorded.difference(wanted)
            for binding in sorted(stale):
                if binding.exchange in topology.RETIRED_EXCHANGES:
                    continue  # dropped from the record only (see RETIRED_EXCHANGES)
                await queue.unbind(binding.exchange, binding.routing_key)
                logger.info("queue %s: unbound %s %r", queue.name, *binding)
            removed |= stale
            if await ledger._replace_if(queue.name, read, wanted, expires):
                return removed
        logger.warning(
            "queue %s: bindings not recorded, other starts kept recording first (%d attempts)",
            queue.name,
            _ATTEMPTS,
        )
    except _LedgerDown as exc:
        logger.warning(
            "queue %s: bound as declared, but stale bindings were not removed "
            "(Redis unreachable: %s)",
            queue.name,
            exc,
        )
        # Again: Redis may have failed before the first attempt bound anything.
        await _bind(queue, wanted)
    return removed
