"""pytest fixtures that run agents against the real RabbitMQ and Redis.

Each test that uses ``mesh_settings`` (or a fixture built on it) gets a vhost ``mesh-test-<id>``
and a Redis namespace ``test-<id>`` of its own, both deleted afterwards.  The broker and Redis
are those of ``MESH_AMQP_URL`` and ``MESH_REDIS_URL``; vhosts are made through RabbitMQ's
management API (``MESH_MANAGEMENT_URL``, by default port 15672 of the AMQP host), whose user
needs the ``administrator`` tag.

Needs pytest-asyncio (``pip install 'agentmesh[testing]'``) with ``asyncio_mode = "auto"``, or
tests marked ``@pytest.mark.asyncio``.  The fixtures run in the event loop that
``asyncio_default_fixture_loop_scope`` names, which must be the tests' own (``function``).

Fixtures (override any in a ``conftest.py``: ``mesh_base_settings`` to point them elsewhere,
``mesh_gateway`` to run a gateway with stages of one's own):

``mesh_base_settings``  session: what every test's settings are derived from (the environment)
``mesh_management``     session: the management API (``mesh.management.ManagementAPI``)
``mesh_redis``          a Redis client
``mesh_namespace``      a Redis key namespace of the test's own (no vhost)
``mesh_settings``       settings on a vhost and namespace of the test's own
``mesh_gateway``        a running ``Gateway``
``mesh_client``         a running ``Client``
``mesh_harness``        a ``MeshHarness`` next to the gateway: start agents, publish, call,
                        subscribe and wait for the next message

Loaded by pytest wherever agentmesh is installed; ``-p no:mesh`` turns it off.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mesh import BrokerUnavailable
from mesh.client import Client
from mesh.config import ConfigError, Settings
from mesh.gateway import Gateway
from mesh.management import ManagementAPI, ManagementError
from mesh.testing.harness import MeshHarness
from mesh.testing.isolation import delete_namespace, new_namespace, own_vhost

NEEDS_PYTEST_ASYNCIO = (
    "the mesh_* fixtures need pytest-asyncio: pip install 'agentmesh[testing]' "
    '(or pytest-asyncio), and set asyncio_mode = "auto"'
)


def _async_fixture(function: Callable[..., Any]) -> Any:
    """``function`` as a pytest-asyncio fixture, or one that says pytest-asyncio is missing."""
    try:
        import pytest_asyncio
    except ImportError:
        # Plugins of the pytest11 entry point load in every pytest run of the environment:
        # failing to import would break suites that never use the mesh.
        def needs_pytest_asyncio() -> None:
            pytest.fail(NEEDS_PYTEST_ASYNCIO, pytrace=False)

        return pytest.fixture(name=function.__name__)(needs_pytest_asyncio)
    return pytest_asyncio.fixture(function)


@contextmanager
def _in_one_line() -> Iterator[None]:
    """Missing services fail the fixture with the one line saying what to do, not a
    traceback through the plugin."""
    # pytest.fail's own exception, raised "from None": pytest.fail() would chain the error.
    try:
        yield
    except (ManagementError, BrokerUnavailable, ConfigError) as exc:
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
    except RedisError as exc:
        raise pytest.fail.Exception(f"Redis (MESH_REDIS_URL): {exc}", pytrace=False) from None


@pytest.fixture(scope="session")
def mesh_base_settings() -> Settings:
    """What every test's settings are derived from: ``Settings.from_env()``."""
    with _in_one_line():
        return Settings.from_env()


@pytest.fixture(scope="session")
def mesh_management(mesh_base_settings: Settings) -> ManagementAPI:
    """RabbitMQ's management API, as the user in ``MESH_MANAGEMENT_URL``."""
    with _in_one_line():
        return ManagementAPI.for_settings(mesh_base_settings)


@_async_fixture
async def mesh_redis(mesh_base_settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A Redis client (the test's keys belong under ``mesh_namespace``)."""
    client = aioredis.from_url(mesh_base_settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@_async_fixture
async def mesh_namespace(mesh_redis: aioredis.Redis) -> AsyncIterator[str]:
    """A Redis key namespace no other test uses (``test-<id>``); its keys go afterwards."""
    namespace = new_namespace()
    yield namespace
    with _in_one_line():
        await delete_namespace(mesh_redis, namespace)


@_async_fixture
async def mesh_settings(
    mesh_base_settings: Settings, mesh_management: ManagementAPI, mesh_namespace: str
) -> AsyncIterator[Settings]:
    """Settings on a vhost (``mesh-test-<id>``) and namespace of the test's own."""
    with _in_one_line():
        async with own_vhost(mesh_base_settings, mesh_namespace, mesh_management) as settings:
            yield settings


@_async_fixture
async def mesh_gateway(mesh_settings: Settings) -> AsyncIterator[Gateway]:
    """A running gateway: without one no message reaches anybody."""
    gateway = Gateway(settings=mesh_settings)
    with _in_one_line():
        async with gateway:
            yield gateway


@_async_fixture
async def mesh_client(mesh_settings: Settings) -> AsyncIterator[Client]:
    """A running client: publishes, requests and control commands as the test."""
    client = Client(settings=mesh_settings)
    with _in_one_line():
        async with client:
            yield client


@_async_fixture
async def mesh_harness(
    mesh_settings: Settings, mesh_gateway: Gateway, mesh_client: Client
) -> AsyncIterator[MeshHarness]:
    """Starts the test's agents (stopped afterwards), publishes, calls and subscribes."""
    async with aclosing(MeshHarness(mesh_settings, mesh_client)) as harness:
        yield harness
