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

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from aio_pika.abc import AbstractQueue
from redis.exceptions import WatchError

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


class _Entry:
    """A queue's record read under WATCH: ``replace`` fails if anyone wrote it since."""

    def __init__(self, pipe: Any, key: str, bindings: set[Binding]) -> None:
        self._pipe = pipe
        self._key = key
        self.bindings = bindings

    async def replace(self, bindings: Iterable[Binding], expires: float | None) -> bool:
        """Record ``bindings``; False (nothing written) if the record changed since the read."""
        self._pipe.multi()
        _replace(self._pipe, self._key, bindings, expires)
        try:
            await self._pipe.execute()
        except WatchError:
            # Also what redis-py raises when the connection drops under a WATCH; the next
            # attempt's WATCH then fails as an outage.
            return False
        except REDIS_DOWN as exc:
            raise _LedgerDown(str(exc)) from exc
        return True


class BindingLedger:
    """The bindings each queue was last declared with, one Redis set per queue."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace

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

    @contextlib.asynccontextmanager
    async def _watch(self, queue: str) -> AsyncIterator[_Entry]:
        """``queue``'s record, read under WATCH on a connection held until the block ends."""
        key = self.key(queue)
        pipe = self.redis.pipeline(transaction=True)
        try:
            try:
                await pipe.watch(key)
                members = await pipe.smembers(key)
            except REDIS_DOWN as exc:
                raise _LedgerDown(str(exc)) from exc
            yield _Entry(pipe, key, _decode(members))
        finally:
            # A failed UNWATCH drops the connection, and the WATCH with it.
            with contextlib.suppress(*REDIS_DOWN):
                await pipe.aclose()


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
    # are dead-lettered. "Exactly" (once every start got to record) needs the WATCH: without it
    # two starts reading the same record could each leave the other's bindings on the broker,
    # unrecorded for good. Each attempt binds and unbinds after its read, so when another start
    # recorded in between, this one starts over from that record.
    try:
        for _ in range(_ATTEMPTS):
            async with ledger._watch(queue.name) as entry:
                await _bind(queue, wanted)
                stale = entry.bindings.difference(wanted)
                for binding in sorted(stale):
                    if binding.exchange in topology.RETIRED_EXCHANGES:
                        continue  # dropped from the record only (see RETIRED_EXCHANGES)
                    await queue.unbind(binding.exchange, binding.routing_key)
                    logger.info("queue %s: unbound %s %r", queue.name, *binding)
                removed |= stale
                if await entry.replace(wanted, expires):
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
