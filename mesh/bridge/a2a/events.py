"""A task's events for subscribers on other replicas (``SubscribeToTask``).

The replica running a task writes each event with the task itself (``RedisTaskStore``), to
the stream ``<namespace>:a2a:events:<id>``; so ``publish`` has nothing left to do, and a
subscriber elsewhere reads that stream every ``poll`` seconds (the bridge's Redis user may
not use pub/sub, and a blocking read would hold a Redis connection per subscriber).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import redis.asyncio as aioredis
from a2a.server.cluster import TaskEventStream, TaskVersion, VersionedEvent
from a2a.server.events import Event
from a2a.types import StreamResponse

from mesh.bridge.a2a.tasks import RedisTaskStore

POLL = 0.2
"""Seconds between reads of a task's events while nothing new came."""


class RedisTaskEvents(TaskEventStream):
    """Reads the events ``store`` writes."""

    def __init__(self, redis: aioredis.Redis, store: RedisTaskStore, *, poll: float = POLL) -> None:
        self.redis = redis
        self.store = store
        self.poll = poll

    async def publish(self, task_id: str, event: VersionedEvent) -> None:
        del task_id, event  # written with the task, in the same script

    async def subscribe(
        self, task_id: str, *, after: TaskVersion
    ) -> AsyncGenerator[VersionedEvent, None]:
        """The events of ``task_id`` newer than ``after``, until the task is gone (the SDK
        stops reading at a terminal state)."""
        key = self.store.events_key(task_id)
        cursor = "-"
        while True:
            entries: Any = await self.redis.xrange(
                key, min=cursor
            )
            for entry_id, fields in entries:
                cursor = f"({entry_id.decode()}"
                version = TaskVersion(int(fields[b"version"]))
                if version.is_after(after):
                    yield VersionedEvent(_event(fields[b"event"]), version)
            if not entries:
                if not await self.redis.exists(self.store.task_key(task_id)):
                    return
                await asyncio.sleep(self.poll)

    async def destroy(self, task_id: str) -> None:
        del task_id  # the stream expires with its task


def _event(data: bytes) -> Event:
    response = StreamResponse.FromString(data)
    kind = response.WhichOneof("payload")
    if kind == "task":
        return response.task
    if kind == "status_update":
        return response.status_update
    if kind == "artifact_update":
        return response.artifact_update
    return response.message

