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

# What a Redis outage looks like from redis-py: its own errors, or the socket's.
REDIS_DOWN = (RedisError, OSError)


class Membership:
    """Registers the instance, heartbeats its lease, and publishes ``_registry.<event>``.

    Redis being unreachable never stops the agent: the heartbeat loop keeps trying and
    registers again (announcing a fresh ``join``) once Redis answers and the lease is gone.
    """

    def __init__(
        self,
        registry: Registry,
        describe: Callable[[], InstanceRecord],
        announce: Announce,
        interval: float,
    ) -> None:
        self.registry = registry
        self.describe = describe
        self.announce = announce
        self.interval = interval
        self.registered = False
        self.left = False
        self._outage = False

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
        try:
            alive = self.registered and await self.registry.heartbeat(record.agent, record.instance)
        except REDIS_DOWN as exc:
            self._down(exc)
            return
        if not alive and not self.left:
            await self._register("join")
        elif self._outage:
            self._outage = False
            logger.info("Redis reachable again; registration current")

    async def _register(self, event: str, **extra: Any) -> None:
        record = self.describe()
        try:
            await self.registry.register(record)
        except REDIS_DOWN as exc:
            self.registered = False
            self._down(exc)
            return
        if self._outage:
            self._outage = False
            logger.info("Redis reachable again; registered %s/%s", record.agent, record.instance)
        self.registered = True
        await self._announce(event, {**record.model_dump(mode="json"), **extra})
        if self.describe().behaviours != record.behaviours:
            # A behaviour changed while the write was in flight; its own update may have
            # been skipped (not yet registered), so write the newer record now.
            await self._register("behaviour")

    async def _announce(self, event: str, payload: dict[str, Any]) -> None:
        try:
            await self.announce(event, payload)
        except PublishError as exc:
            logger.warning("could not announce %s: %s", event, exc)

    def _down(self, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            logger.warning("Redis unreachable (%s); retrying every %gs", exc, self.interval)
