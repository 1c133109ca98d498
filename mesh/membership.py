"""Membership: keeps one instance's registry entry alive and announces its changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from mesh.registry import InstanceRecord, Registry
from mesh.transport import PublishError

logger = logging.getLogger(__name__)

Announce = Callable[[str, dict[str, Any]], Awaitable[None]]

REANNOUNCE_AFTER = 10
"""Heartbeats an instance the indexes do not hold waits before it announces itself again."""

# What a Redis outage looks like from redis-py: its own errors, or the socket's.
REDIS_DOWN = (RedisError, OSError)


class Membership:
    """Registers the instance, heartbeats its lease, and publishes ``_registry.<event>``.

    Redis being unreachable never stops the agent: the heartbeat loop keeps trying and
    registers again (announcing a fresh ``join``) once Redis answers and the lease is gone.
    An announcement the broker refused is made again at the next heartbeat: the gateway
    indexes the instance for discovery when its event passes.  ``indexes_itself`` is for
    the gateway, which keeps the indexes and so writes its own entry at once.
    """

    def __init__(
        self,
        registry: Registry,
        describe: Callable[[], InstanceRecord],
        announce: Announce,
        interval: float,
        *,
        indexes_itself: bool = False,
    ) -> None:
        self.registry = registry
        self.indexes_itself = indexes_itself
        self.tag = ""
        """The tag of the record last registered."""
        self._unannounced: str | None = None
        self._unindexed = 0  # heartbeats since the indexes last held the current record
        self.describe = describe
        self.announce = announce
        self.interval = interval
        self.registered = False
        self.left = False
        self._outage = False

    @property
    def redis_down(self) -> bool:
        """Whether the last registration or heartbeat found Redis unreachable."""
        return self._outage

    async def join(self) -> None:
        self.left = False
        await self._register("join")

    async def changed(self, behaviour: str) -> None:
        """A behaviour's status changed: rewrite the record and announce it."""
        await self._register("behaviour", behaviour=behaviour)

    async def leave(self) -> None:
        self.left = True  # a heartbeat still in flight must not register us again
        record = self.describe()
        try:
            await self.registry.deregister(record.agent, record.instance)
        except REDIS_DOWN as exc:
            logger.warning(
                "could not deregister (Redis unreachable: %s); the lease will lapse", exc
            )
        await self._announce("leave", {"agent": record.agent, "instance": record.instance})
        self.registered = False

    async def run(self) -> None:
        """Heartbeat every ``interval`` until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()

    async def beat(self) -> None:
        if self.left:
            return
        record = self.describe()
        alive = indexed = False
        try:
            if self.registered:
                alive, indexed = await self.registry.renew(record.agent, record.instance, self.tag)
        except REDIS_DOWN as exc:
            self._down(exc)
            return
        self._unindexed = 0 if indexed or self.indexes_itself else self._unindexed + 1
        if not alive and not self.left:
            await self._register("join")
        elif self._unannounced is not None:
            await self._register(self._unannounced)
        elif self._unindexed >= REANNOUNCE_AFTER:
            # No gateway indexed the last announcement (none ran, or it could not reach
            # Redis then): announce again, every so often rather than at every beat.
            self._unindexed = 0
            await self._register("join")
        elif self._outage:
            self._outage = False
            logger.info("Redis reachable again; registration current")

    async def _register(self, event: str, **extra: Any) -> None:
        record = self.describe()
        try:
            self.tag = await self.registry.register(record)
            if self.indexes_itself:
                await self.registry.index(record.agent, record.instance)
        except REDIS_DOWN as exc:
            self.registered = False
            self._down(exc)
            return
        if self._outage:
            self._outage = False
            logger.info("Redis reachable again; registered %s/%s", record.agent, record.instance)
        self.registered = True
        announced = await self._announce(event, {**record.model_dump(mode="json"), **extra})
        # A join not heard keeps the instance out of discovery: that one must be made again.
        if not announced and (event == "join" or self._unannounced is None):
            self._unannounced = event
        elif announced:
            self._unannounced = None
        if self.describe().behaviours != record.behaviours:
            # A behaviour changed while the write was in flight; its own update may have
            # been skipped (not yet registered), so write the newer record now.
            await self._register("behaviour")

    async def _announce(self, event: str, payload: dict[str, Any]) -> bool:
        try:
            await self.announce(event, payload)
        except PublishError as exc:
            logger.warning("could not announce %s (again at the next heartbeat): %s", event, exc)
            return False
        return True

    def _down(self, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            logger.warning("Redis unreachable (%s); retrying every %gs", exc, self.interval)
