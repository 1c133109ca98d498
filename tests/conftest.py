"""Fixtures for the whole suite: the real RabbitMQ and Redis, isolated per test.

The suite uses the package's own pytest plugin (``mesh.testing.plugin``): each test that asks
for ``settings`` gets its own RabbitMQ vhost (``mesh-test-<id>``) and Redis key namespace
(``test-<id>``); both are removed afterwards. A test that needs only Redis asks for
``namespace`` (and ``redis``) instead, and no vhost is made for it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from helpers import PrivateRedis, free_port
from pydantic import SecretStr

from mesh.config import Settings
from mesh.devservices import BrokerAdmin, Services, ensure_services


@pytest.fixture(scope="session")
def services() -> Services:
    """RabbitMQ and Redis for the run, found (or started privately) once."""
    return ensure_services()


@pytest.fixture(scope="session")
def admin(services: Services) -> BrokerAdmin:
    """rabbitmqctl-backed broker administration (for closing connections broker-side)."""
    return services.admin()


@pytest.fixture(scope="session")
def mesh_base_settings(services: Services) -> Settings:
    """The plugin's fixtures use the services found or started for this run (a private
    broker's management API listens on a port of its own)."""
    return services.settings.model_copy(update={"management_url": services.management_url})


@pytest.fixture
def namespace(mesh_namespace: str) -> str:
    return mesh_namespace


@pytest.fixture
def settings(mesh_settings: Settings) -> Settings:
    """The plugin's, with an audit key: the suite's gateways keep an audit trail, which the
    tests read to see what a gateway decided (``helpers.decision_of``)."""
    return mesh_settings.model_copy(update={"audit_key": SecretStr(secrets.token_hex(24))})


@pytest.fixture
def redis(mesh_redis: aioredis.Redis) -> aioredis.Redis:
    return mesh_redis


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A throwaway ``redis-server`` of the test's own, to stop and start again."""
    server = PrivateRedis(free_port(), tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()
