"""Test helpers shared by the whole suite. Tests synchronise by polling, never by sleeping."""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from mesh import Agent, Settings
from mesh.audit import AuditReader, AuditRecord
from mesh.management import ManagementAPI, vhost_of
from mesh.membership import REDIS_DOWN
from mesh.policy import broker_user
from mesh.provision.credentials import url_as

T = TypeVar("T")


def _describe(predicate: Callable[..., Any]) -> str:
    # A lambda's source line says more in a failure than "<lambda>".
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return getattr(predicate, "__qualname__", repr(predicate))


async def eventually(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | None = None,
) -> T:
    """Poll ``predicate`` (sync or async) until it returns something truthy, and return that.

    An AssertionError raised by the predicate counts as "not yet", so predicates may assert.
    After ``timeout`` seconds raises AssertionError naming the condition and its last result.
    """
    deadline = time.monotonic() + timeout
    while True:
        last_error: AssertionError | None = None
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]
        except AssertionError as exc:
            last_error = exc
            result = None  # type: ignore[assignment]
        if time.monotonic() >= deadline:
            detail = f"last error: {last_error}" if last_error else f"last result: {result!r}"
            raise AssertionError(
                f"not true within {timeout}s: {what or _describe(predicate)} ({detail})"
            )
        await asyncio.sleep(interval)


async def take(queue: asyncio.Queue[T], count: int, timeout: float = 15.0) -> list[T]:
    """The next ``count`` items of ``queue``; ``TimeoutError`` if they do not come in time."""
    async with asyncio.timeout(timeout):
        return [await queue.get() for _ in range(count)]


@asynccontextmanager
async def running(*agents: Agent) -> AsyncIterator[None]:
    """Start ``agents`` in order and stop them in reverse order afterwards."""
    async with AsyncExitStack() as stack:
        for agent in agents:
            await stack.enter_async_context(agent)
        yield


def free_port() -> int:
    """A local port nothing listens on (bound and released again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(settings: Settings) -> dict[str, str]:
    """Environment that points a ``mesh`` command at ``settings``' vhost and namespace."""
    return {
        "MESH_AMQP_URL": settings.amqp_url,
        "MESH_REDIS_URL": settings.redis_url,
        "MESH_NAMESPACE": settings.namespace,
    }


async def mesh_cli(settings: Settings, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """Run ``mesh ARGS`` on ``settings``; ``(exit code, stdout, stderr)``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.cli", *args,
        env={**os.environ, **cli_env(settings)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    return int(process.returncode or 0), out.decode(), err.decode()


class PrivateRedis:
    """A throwaway ``redis-server`` on its own port, with no persistence unless ``durable``:
    then every write is in its append-only file before Redis answers, so what it stored
    survives a kill (``workdir`` is kept between starts)."""

    def __init__(self, port: int, workdir: Path, *, durable: bool = False) -> None:
        self.port = port
        self.workdir = workdir
        self.durable = durable
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.skip("redis-server is not installed")
        self.process = await asyncio.create_subprocess_exec(
            server,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.durable else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.workdir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await eventually(self.answers, what=f"private redis-server on port {self.port} answers")

    async def answers(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            raise RuntimeError(
                f"redis-server on port {self.port} exited: {self.process.returncode}"
            )
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            return bool(await client.ping())
        except REDIS_DOWN:
            return False
        finally:
            await client.aclose()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def decision_of(settings: Settings, message_id: str, timeout: float = 15.0) -> AuditRecord:
    """The audit record of the gateway's decision on ``message_id`` (polled: the gateway
    appends it as it decides).  A deadline, not a cancelling timeout: a cancel landing inside a
    redis-py call can be lost there."""
    client = aioredis.Redis.from_url(settings.redis_url)
    reader = AuditReader(client, settings.namespace)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            async for entry in reader.entries(newest_first=True):
                if entry.record.message_id == message_id:
                    return entry.record
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    raise AssertionError(f"no audit record of {message_id} within {timeout}s")


@asynccontextmanager
async def principals(
    settings: Settings, policy: Path
) -> AsyncIterator[Callable[[str], Awaitable[Settings]]]:
    """Gives settings that enforce ``policy`` and connect as a principal's broker user, made
    here with full rights on the test's vhost (the broker's own checks are tested in
    test_permissions.py); the users are deleted afterwards."""
    api = ManagementAPI.for_settings(settings)
    made: list[str] = []

    async def settings_for(principal: str) -> Settings:
        user = broker_user(settings.namespace, principal)
        password = secrets.token_urlsafe(16)
        await api.put_user(user, password)
        made.append(user)
        await api.set_permissions(vhost_of(settings), user, ".*", ".*", ".*")
        url = url_as(settings.amqp_url, user, password)
        return settings.model_copy(update={"amqp_url": url, "policy": str(policy)})

    try:
        yield settings_for
    finally:
        for user in made:
            await api.delete_user(user)


class WireBytes(str):
    """A string that goes on the wire as ``raw``, UTF-8 or not: any AMQP client can send a
    header string that is not UTF-8 (aiormq reads it back as ``bytes``)."""

    raw: bytes

    def __new__(cls, raw: bytes) -> WireBytes:
        text = super().__new__(cls, raw.decode("latin-1"))
        text.raw = raw
        return text

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw

    def __repr__(self) -> str:
        return f"WireBytes({self.raw!r})"
