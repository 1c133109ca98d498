"""The gateway's gate: closed while Redis cannot answer, so no message passes unchecked.

Rate limits, reply bindings and the audit trail live in Redis.  When a stage cannot reach it
(``Unavailable``), the gate closes: messages being relayed wait at it, unacked, and the
broker, its prefetch window full, sends no more; nothing is lost and nothing passes
unaudited.  A probe asks Redis every ``interval`` seconds and opens the gate once it answers.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from mesh.membership import REDIS_DOWN

logger = logging.getLogger(__name__)


class RedisGate:
    def __init__(self, redis: aioredis.Redis, interval: float = 0.5) -> None:
        self.redis = redis
        self.interval = interval
        self._open = asyncio.Event()
        self._open.set()
        self._probe: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def wait(self) -> None:
        """Return once the gate is open."""
        await self._open.wait()

    def close(self, reason: BaseException) -> None:
        """Close the gate (once, however many stages find Redis gone) until Redis answers."""
        if not self._open.is_set():
            return
        self._open.clear()
        logger.error(
            "Redis unreachable (%s): the gateway takes no messages until it answers; those "
            "in hand wait, unacknowledged",
            reason,
        )
        self._probe = asyncio.get_running_loop().create_task(self._until_redis_answers())

    async def _until_redis_answers(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.redis.ping()
            except REDIS_DOWN:
                continue
            logger.warning("Redis answers again: the gateway takes messages again")
            self._open.set()
            return

    async def close_probe(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
