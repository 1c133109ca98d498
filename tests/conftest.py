"""Fixtures for the whole suite: the real RabbitMQ and Redis, isolated per test.

Each test that asks for ``settings`` gets its own RabbitMQ vhost (``mesh-test-<id>``) and Redis
key namespace (``test-<id>``); both are removed afterwards. A test that needs only Redis asks for
``namespace`` (and ``redis``) instead, and no vhost is made for it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from helpers import delete_namespace

from mesh.config import Settings
from mesh.devservices import BrokerAdmin, Services, ensure_services, with_vhost


@pytest.fixture(scope="session")
def services() -> Services:
    """RabbitMQ and Redis for the run, found (or started privately) once."""
    return ensure_services()


@pytest.fixture(scope="session")
def admin(services: Services) -> BrokerAdmin:
    """rabbitmqctl-backed broker administration for the services' broker."""
    return services.admin()


@pytest.fixture
async def namespace(services: Services) -> AsyncIterator[str]:
    """A brand-new Redis key namespace (``test-<id>``), its keys deleted after the test."""
    test_namespace = f"test-{uuid.uuid4().hex[:8]}"
    try:
        yield test_namespace
    finally:
        client = aioredis.from_url(services.settings.redis_url)
        try:
            await delete_namespace(client, test_namespace)
        finally:
            await client.aclose()


@pytest.fixture
async def settings(
    services: Services, admin: BrokerAdmin, namespace: str
) -> AsyncIterator[Settings]:
    """Settings on a brand-new vhost and Redis namespace, both deleted after the test."""
    vhost = f"mesh-{namespace}"
    await admin.create_vhost(vhost)
    try:
        yield Settings.from_env(
            amqp_url=with_vhost(services.settings.amqp_url, vhost),
            redis_url=services.settings.redis_url,
            namespace=namespace,
        )
    finally:
        # Deleting the vhost also closes any connection a test left open on it.
        await admin.delete_vhost(vhost)


@pytest.fixture
async def redis(services: Services) -> AsyncIterator[aioredis.Redis]:
    """A Redis client on the test's Redis (keys belong under the test's ``namespace``)."""
    client = aioredis.from_url(services.settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()
