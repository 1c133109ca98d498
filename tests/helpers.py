"""Test helpers shared by the whole suite. Tests synchronise by polling, never by sleeping."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

from mesh import Agent, Settings

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
