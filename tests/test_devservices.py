"""devservices against the real broker and Redis: vhosts, broker-side closes, error messages."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as aioredis
from helpers import eventually, free_port

from mesh.config import Settings
from mesh.devservices import (
    BrokerAdmin,
    DevServicesError,
    Probe,
    Services,
    ensure_services,
    parse_endpoint,
    probe,
    with_vhost,
)
from mesh.testing import delete_namespace

REPO = Path(__file__).resolve().parent.parent


def test_services_answer(services: Services) -> None:
    assert services.ok
    assert probe(services.rabbitmq.endpoint) is Probe.ANSWERS
    assert probe(services.redis.endpoint) is Probe.ANSWERS
    env = services.environ()
    assert env["MESH_AMQP_URL"] == services.settings.amqp_url
    assert env["MESH_REDIS_URL"] == services.settings.redis_url


def test_probe_tells_nothing_from_something_else() -> None:
    port = free_port()
    assert probe(parse_endpoint("rabbitmq", f"amqp://127.0.0.1:{port}/")) is Probe.NOTHING
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        other = listener.getsockname()[1]
        # A listener that never speaks AMQP is not a broker.
        found = probe(parse_endpoint("rabbitmq", f"amqp://127.0.0.1:{other}/"), timeout=0.3)
        assert found is Probe.OTHER


async def test_vhost_round_trip(services: Services, admin: BrokerAdmin) -> None:
    vhost = f"mesh-test-{uuid.uuid4().hex[:8]}"
    await admin.create_vhost(vhost)
    try:
        assert vhost in await admin.list_vhosts()
        # The URL's user got permissions: it can declare and use a queue there.
        connection = await aio_pika.connect(with_vhost(services.settings.amqp_url, vhost))
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await channel.default_exchange.publish(aio_pika.Message(b"hi"), queue.name)
            message = await queue.get(timeout=5)
            assert message.body == b"hi"
    finally:
        await admin.delete_vhost(vhost)
    assert vhost not in await admin.list_vhosts()
    await admin.delete_vhost(vhost)  # deleting again is fine


async def test_settings_fixture_isolates(settings: Settings, admin: BrokerAdmin) -> None:
    vhost = parse_endpoint("rabbitmq", settings.amqp_url).vhost
    assert vhost.startswith("mesh-test-")
    assert settings.namespace.startswith("test-")
    assert vhost.removeprefix("mesh-test-") == settings.namespace.removeprefix("test-")
    assert vhost in await admin.list_vhosts()


async def test_close_connections_drops_a_plain_connection(
    settings: Settings, admin: BrokerAdmin
) -> None:
    vhost = parse_endpoint("rabbitmq", settings.amqp_url).vhost
    connection = await aio_pika.connect(
        settings.amqp_url, client_properties={"connection_name": "devservices-test"}
    )
    closed: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    connection.close_callbacks.add(
        lambda _sender, exc: closed.done() or closed.set_result(exc)  # type: ignore[func-returns-value]
    )
    try:
        listed = await eventually(lambda: admin.list_connections(vhost))
        assert [c.user for c in listed] == [admin.endpoint.username or "guest"]

        await admin.close_connections(vhost, "devservices test")

        reason = await asyncio.wait_for(closed, 10)
        assert "CONNECTION_FORCED" in str(reason)
        assert "devservices test" in str(reason)
        assert not connection.connected.is_set()
        await eventually(lambda: _no_connections(admin, vhost))
    finally:
        await connection.close()


async def _no_connections(admin: BrokerAdmin, vhost: str) -> bool:
    return not await admin.list_connections(vhost)


async def test_redis_fixture_and_namespace_cleanup(
    settings: Settings, redis: aioredis.Redis
) -> None:
    inside = [f"{settings.namespace}:a", f"{settings.namespace}:b:c"]
    outside = f"{settings.namespace}-other:x"
    for key in [*inside, outside]:
        await redis.set(key, "1")
    try:
        assert await delete_namespace(redis, settings.namespace) == 2
        assert await redis.exists(*inside) == 0
        assert await redis.exists(outside) == 1
    finally:
        await redis.unlink(outside)


async def test_eventually_reports_the_condition() -> None:
    with pytest.raises(AssertionError, match="never true"):
        await eventually(lambda: False, timeout=0.1, what="never true")
    assert await eventually(lambda: 42, timeout=0.1) == 42


def test_missing_programs_are_named(tmp_path: Path, services: Services) -> None:
    amqp_port, redis_port = free_port(), free_port()
    settings = Settings(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{amqp_port}/",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
    )
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    # No servers and no apt-get on this search path, so nothing can be started or installed.
    with pytest.raises(DevServicesError) as caught:
        ensure_services(settings, state_dir=tmp_path / "state", search_path=str(empty_bin))
    assert str(caught.value).splitlines() == [
        f"RabbitMQ is not answering at 127.0.0.1:{amqp_port} and rabbitmq-server is not "
        "installed: run `sudo apt-get install rabbitmq-server` or set MESH_AMQP_URL",
        f"Redis is not answering at 127.0.0.1:{redis_port} and redis-server is not "
        "installed: run `sudo apt-get install redis-server` or set MESH_REDIS_URL",
    ]

    # Only the missing one is named when the other answers.
    only_redis = settings.model_copy(update={"amqp_url": services.settings.amqp_url})
    with pytest.raises(DevServicesError) as caught:
        ensure_services(only_redis, state_dir=tmp_path / "state", search_path=str(empty_bin))
    assert str(caught.value) == (
        f"Redis is not answering at 127.0.0.1:{redis_port} and redis-server is not "
        "installed: run `sudo apt-get install redis-server` or set MESH_REDIS_URL"
    )


def test_command_line_reports_what_it_cannot_do(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "MESH_AMQP_URL": "amqp://guest:guest@mq.example.invalid:5672/",
        "MESH_DEV_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "mesh.devservices", "exec", "--", "echo", "ran"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""  # the command never ran
    assert result.stderr == (
        "devservices: RabbitMQ is not answering at mq.example.invalid:5672 (MESH_AMQP_URL), "
        "which is not this machine: start it there, or point MESH_AMQP_URL at a running "
        "RabbitMQ\n"
    )


def test_remote_broker_cannot_be_administered() -> None:
    remote = Settings(amqp_url="amqp://guest:guest@mq.example.invalid:5672/")
    with pytest.raises(DevServicesError, match="not on this machine"):
        BrokerAdmin.for_settings(remote, environ={})


def test_remote_service_is_not_started(tmp_path: Path, services: Services) -> None:
    remote = Settings(
        amqp_url=services.settings.amqp_url, redis_url="redis://redis.example.invalid:6379/0"
    )
    with pytest.raises(DevServicesError, match=r"not answering at redis\.example\.invalid:6379"):
        ensure_services(remote, state_dir=tmp_path)
