"""Counts of dead letters per queue and reason, kept in Redis (``mesh queues`` shows them).

Kept by the gateway's ``DeadLetterFiler`` as it files each dead letter in ``mesh.dead`` (at
least once: a filer that dies between filing and acking counts that one again).  Each count
names the queue a message died in and why: the broker's reason (``maxlen`` for the oldest
message dropped from a full queue, ``expired``, ``rejected``, ``delivery_limit``) or
``mesh`` for a dead letter an agent or the gateway sent with a reason of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from mesh.envelope import H_QUEUE

MESH_REASON = "mesh"
DROPPED = "maxlen"

_SEPARATOR = "|"


@dataclass
class QueueDeaths:
    """What died in one queue, by reason."""

    queue: str
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        """Messages the queue dropped because it was full."""
        return self.reasons.get(DROPPED, 0)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


def death_of(dead_letter: AbstractIncomingMessage) -> tuple[str, str]:
    """``(queue, reason)`` of a message read from ``mesh.dead``."""
    headers = dead_letter.headers or {}
    if H_QUEUE in headers:
        return str(headers[H_QUEUE]), MESH_REASON
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        latest = deaths[0]  # the broker puts the most recent death first
        return _text(latest.get("queue")), _text(latest.get("reason"))
    return _text(headers.get("x-first-death-queue")), _text(headers.get("x-first-death-reason"))


BROKER_REASONS = {
    DROPPED: "dropped from a full queue (maxlen): it held max_queue_length newer messages",
    "expired": "expired (its TTL ran out) before anyone took it",
    "rejected": "rejected without requeue",
    "delivery_limit": "delivered more often than the queue's delivery limit",
}


def describe(reason: str) -> str:
    """The text a dead letter the broker made carries in ``x-mesh-reason``."""
    return f"{BROKER_REASONS.get(reason, reason)} ({reason})"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "?")


class DeadLetterCounts:
    """One Redis hash: a count per queue and reason."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self.key = f"{namespace}:dead:counts"

    async def add(self, queue: str, reason: str) -> None:
        await self.redis.hincrby(self.key, f"{queue}{_SEPARATOR}{reason}", 1)

    async def by_queue(self) -> dict[str, QueueDeaths]:
        found: dict[str, QueueDeaths] = {}
        for raw_field, raw_count in (await self.redis.hgetall(self.key)).items():
            queue, _, reason = _text(raw_field).rpartition(_SEPARATOR)
            entry = found.setdefault(queue, QueueDeaths(queue))
            entry.reasons[reason] = int(raw_count)
        return found

    async def forget(self, queues: Sequence[str]) -> None:
        """Drop the counts of ``queues`` (they were deleted)."""
        gone = set(queues)
        fields = [
            raw
            for raw in await self.redis.hkeys(self.key)
            if _text(raw).rpartition(_SEPARATOR)[0] in gone
        ]
        if fields:
            await self.redis.hdel(self.key, *fields)
