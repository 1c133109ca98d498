"""Which messages an ``idempotent`` behaviour has handled, kept in Redis for a window."""

from __future__ import annotations

import enum

import redis.asyncio as aioredis

_DONE = b"done"
_CLAIMED = b"claimed"


class Claim(enum.Enum):
    """What ``HandledIds.claim`` found."""

    TAKEN = "taken"
    """This delivery may run the handler."""
    DONE = "done"
    """A delivery of the same message was handled already: skip this one."""
    BUSY = "busy"
    """Another delivery of it is being handled right now: try again later."""


class HandledIds:
    """Message ids per agent and behaviour: claimed while handled, done for ``window`` s.

    A claim expires after ``lease`` seconds, so a message whose handler died with its
    process is handled again by the next delivery once the lease ran out.
    """

    def __init__(
        self, redis: aioredis.Redis, namespace: str, *, window: float, lease: float
    ) -> None:
        self.redis = redis
        self.namespace = namespace
        self.window_ms = int(window * 1000)
        self.lease_ms = int(lease * 1000)

    def key(self, agent: str, behaviour: str, message_id: str) -> str:
        return f"{self.namespace}:handled:{agent}:{behaviour}:{message_id}"

    async def claim(self, key: str) -> Claim:
        if await self.redis.set(key, _CLAIMED, nx=True, px=self.lease_ms):
            return Claim.TAKEN
        return Claim.DONE if await self.redis.get(key) == _DONE else Claim.BUSY

    async def done(self, key: str) -> None:
        await self.redis.set(key, _DONE, px=self.window_ms)

    async def release(self, key: str) -> None:
        """Give the claim up (the handler failed): the next delivery handles it."""
        await self.redis.delete(key)
