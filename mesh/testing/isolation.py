"""A RabbitMQ vhost and a Redis key namespace of a test's own, removed after it.

A vhost holds every exchange and queue the mesh declares, so tests on one broker cannot see
each other's messages; the namespace does the same for the registry, state and binding
records in Redis.  Vhosts are made through the management API: about 20 ms a call, where
``rabbitmqctl`` boots an Erlang VM each time (about a second).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis

from mesh.config import Settings
from mesh.devservices import with_vhost
from mesh.management import ManagementAPI

VHOST_PREFIX = "mesh-"
NAMESPACE_PREFIX = "test-"


def new_namespace() -> str:
    """A Redis key namespace no other test uses: ``test-<id>``."""
    return f"{NAMESPACE_PREFIX}{uuid.uuid4().hex[:8]}"


async def delete_namespace(redis: aioredis.Redis, namespace: str) -> int:
    """UNLINK every key under ``<namespace>:``; return how many went."""
    # SCAN, not KEYS: a shared Redis must not stall while one test cleans up.
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", namespace) + ":*"
    deleted = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += await redis.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted


@asynccontextmanager
async def own_vhost(
    base: Settings, namespace: str, api: ManagementAPI | None = None
) -> AsyncIterator[Settings]:
    """``base`` moved to a new vhost ``mesh-<namespace>`` and to ``namespace`` in Redis.

    The vhost is deleted afterwards, which also closes any connection left open on it; the
    namespace's keys are the caller's to delete (``delete_namespace``).
    """
    api = api or ManagementAPI.for_settings(base)
    vhost = f"{VHOST_PREFIX}{namespace}"
    await api.create_vhost(vhost)
    try:
        yield base.model_copy(
            update={"amqp_url": with_vhost(base.amqp_url, vhost), "namespace": namespace}
        )
    finally:
        await api.delete_vhost(vhost)
