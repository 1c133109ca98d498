"""TLS to RabbitMQ and Redis (``amqps://``, ``rediss://``, certificates from settings),
against a private RabbitMQ node with a TLS listener only and a private Redis on a TLS port
only, both requiring a client certificate from a CA this test makes.  The machine's shared
broker and Redis are left alone."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest
from helpers import eventually, free_port
from redis.exceptions import ConnectionError as RedisConnectionError
from tls_ca import CertAuthority, make_ca

from mesh.agent import Agent
from mesh.config import Settings
from mesh.connection import BrokerUnavailable
from mesh.devservices import default_search_path, find_program
from mesh.transport import Transport

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory of the test's own: pytest's tmp_path of a run may be removed by another
    run starting meanwhile (it keeps the newest three), from under a running server."""
    with tempfile.TemporaryDirectory(prefix="mesh-tls-") as directory:
        yield Path(directory)


@pytest.fixture
def ca(workdir: Path) -> CertAuthority:
    (workdir / "ca").mkdir()
    return make_ca(workdir / "ca")


@pytest.fixture
async def tls_redis(ca: CertAuthority, workdir: Path) -> AsyncIterator[int]:
    """A private redis-server listening on a TLS port only; its port."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        server,
        "--port", "0",
        "--tls-port", str(port),
        "--bind", "127.0.0.1",
        "--tls-cert-file", str(ca.server_cert),
        "--tls-key-file", str(ca.server_key),
        "--tls-ca-cert-file", str(ca.ca),
        "--tls-auth-clients", "yes",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await eventually(lambda: _listening(port), what=f"redis TLS port {port} listens")
        yield port
    finally:
        process.kill()
        await process.wait()


@pytest.fixture
async def tls_rabbit(ca: CertAuthority, workdir: Path) -> AsyncIterator[int]:
    """A private RabbitMQ node with one listener, TLS on a free port, that requires a
    client certificate; its port (user guest, vhost /)."""
    server = find_program("rabbitmq-server", default_search_path(), unwrap=True)
    if server is None:
        pytest.skip("rabbitmq-server is not installed")
    port, dist = free_port(), free_port()
    node_dir = workdir / "rabbit"
    home = node_dir / "home"
    for sub in ("home", "log", "mnesia"):
        (node_dir / sub).mkdir(parents=True)
    (home / ".erlang.cookie").write_text(secrets.token_hex(16).upper())
    (home / ".erlang.cookie").chmod(0o400)
    (node_dir / "rabbitmq.conf").write_text(
        "\n".join(
            [
                "listeners.tcp = none",
                f"listeners.ssl.default = 127.0.0.1:{port}",
                f"ssl_options.cacertfile = {ca.ca}",
                f"ssl_options.certfile = {ca.server_cert}",
                f"ssl_options.keyfile = {ca.server_key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
                "loopback_users = none",
                "distribution.listener.interface = 127.0.0.1",
                f"distribution.listener.port_range.min = {dist}",
                f"distribution.listener.port_range.max = {dist}",
                "log.console = false",
            ]
        )
        + "\n"
    )
    (node_dir / "enabled_plugins").write_text("[].\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update(
        HOME=str(home),
        RABBITMQ_BASE=str(node_dir),
        RABBITMQ_CONFIG_FILE=str(node_dir / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(node_dir / "advanced.config"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(node_dir / "enabled_plugins"),
        RABBITMQ_MNESIA_BASE=str(node_dir / "mnesia"),
        RABBITMQ_LOG_BASE=str(node_dir / "log"),
        RABBITMQ_NODENAME=f"mesh-tls-{port}@localhost",
        RABBITMQ_DIST_PORT=str(dist),
        RABBITMQ_CONF_ENV_FILE=str(node_dir / "rabbitmq-env.conf"),
    )
    (node_dir / "rabbitmq-env.conf").write_text("# settings come from the environment\n")
    output = node_dir / "server.out"
    with output.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(server),
            env=env,
            cwd=node_dir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )

    async def listening() -> bool:
        if process.returncode is not None:
            tail = output.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"rabbitmq-server exited {process.returncode}:\n{tail}")
        return await _listening(port)

    try:
        await eventually(listening, timeout=90, what=f"RabbitMQ TLS listener on {port}")
        yield port
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def _tls_settings(ca: CertAuthority, **urls: str) -> Settings:
    return Settings.model_validate(
        {
            "tls_ca_file": str(ca.ca),
            "tls_cert_file": str(ca.client_cert),
            "tls_key_file": str(ca.client_key),
            "connect_timeout": 0,
            **urls,
        }
    )


async def test_agent_redis_over_tls(ca: CertAuthority, tls_redis: int) -> None:
    settings = _tls_settings(ca, redis_url=f"rediss://127.0.0.1:{tls_redis}/0")
    agent = Agent("tls-probe", settings=settings)
    try:
        assert await agent.redis.set("tls:probe", "yes")
        assert await agent.redis.get("tls:probe") == b"yes"
    finally:
        await agent.redis.aclose()
    # The server verifies the client: without its certificate the handshake fails.
    anonymous = Agent("tls-probe", settings=settings.model_copy(update={"tls_cert_file": None}))
    try:
        with pytest.raises(RedisConnectionError):
            await anonymous.redis.ping()
    finally:
        await anonymous.redis.aclose()


async def test_redis_tls_verifies_the_server(ca: CertAuthority, tls_redis: int) -> None:
    # No CA file: the system's trust store does not know the test CA.
    settings = _tls_settings(ca, redis_url=f"rediss://127.0.0.1:{tls_redis}/0")
    agent = Agent("tls-probe", settings=settings.model_copy(update={"tls_ca_file": None}))
    try:
        with pytest.raises(RedisConnectionError, match="certificate verify failed"):
            await agent.redis.ping()
    finally:
        await agent.redis.aclose()


async def test_transport_over_amqps(ca: CertAuthority, tls_rabbit: int) -> None:
    settings = _tls_settings(ca, amqp_url=f"amqps://guest:guest@127.0.0.1:{tls_rabbit}/")
    transport = Transport(settings, "tls-probe")
    await eventually(
        lambda: _connects(transport), timeout=60, what="the TLS node takes a login"
    )
    try:
        assert transport.connected
        queue = await transport.channel.declare_queue("tls-probe", exclusive=True)
        await transport.publish("", "tls-probe", aio_pika.Message(b"over TLS"))
        message = await queue.get(timeout=5)
        assert message.body == b"over TLS"
    finally:
        await transport.close()
    for missing in ("tls_cert_file", "tls_ca_file"):
        # The broker requires the client's certificate; the client verifies the broker's.
        anonymous = Transport(settings.model_copy(update={missing: None}), "tls-probe")
        with pytest.raises(BrokerUnavailable):
            await anonymous.connect()


async def _connects(transport: Transport) -> bool:
    try:
        await transport.connect()
    except BrokerUnavailable:
        return False
    return True
