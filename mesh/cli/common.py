"""What the ``mesh`` commands share: settings, a short-lived client, output helpers."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
import redis.asyncio as aioredis
from click.decorators import FC
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from mesh import logcontext
from mesh.agent import Agent, RemoteError, RequestTimeout
from mesh.client import Client
from mesh.config import ConfigError, Settings
from mesh.connection import BrokerUnavailable
from mesh.tls import redis_tls_options
from mesh.topology import TopicError
from mesh.transport import PublishError

T = TypeVar("T")

COMMAND_CONNECT_TIMEOUT = 2.0
"""Seconds a command (``call``, ``publish`` …) tries to reach RabbitMQ."""


def load_agent_class(spec: str) -> type[Agent]:
    """Import ``module:Class`` (relative to the current directory too)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"{spec!r} is not of the form module:Class")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = f"the current directory ({os.getcwd()}), PYTHONPATH and installed packages"
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc}; looked in {where}"
        ) from None
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if isinstance(cls, type) and issubclass(cls, Agent):
        return cls
    found = sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, Agent) and value.__module__ == module_name
    )
    problem = (
        f"module {module_name!r} has no {attr!r}"
        if cls is None
        else f"{spec!r} is not an Agent subclass"
    )
    raise click.BadParameter(f"{problem} (Agent classes in it: {', '.join(found) or 'none'})")


def log_level_option(description: str) -> Callable[[FC], FC]:
    """``--log-level``: one of ``logcontext.LEVELS``, info by default."""
    return click.option(
        "--log-level",
        type=click.Choice(logcontext.LEVELS, case_sensitive=False),
        default="info",
        show_default=True,
        help=description,
    )


def settings_or_exit() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def with_client(func: Callable[[Agent], Awaitable[T]]) -> T:
    """Run ``func`` with a short-lived agent that has no behaviours (for commands)."""

    async def main() -> T:
        settings = settings_or_exit()
        # A command fails fast when the broker is away; agents keep trying (see run).
        settings = settings.model_copy(update={"connect_timeout": COMMAND_CONNECT_TIMEOUT})
        client = Client(settings=settings)
        async with client:
            return await func(client)

    logcontext.configure("WARNING", brief=True)
    try:
        return asyncio.run(main())
    except (BrokerUnavailable, PublishError, RequestTimeout, RemoteError, TopicError) as exc:
        raise click.ClickException(str(exc)) from None


def command_redis(settings: Settings) -> aioredis.Redis:
    """A Redis client for a command: one attempt per call, whatever the URL asks (each
    redis-py retry would wait a timeout more)."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        retry=RedisRetry(NoBackoff(), 0),
        **redis_tls_options(settings),
    )


def example(*lines: str) -> str:
    """A command's help epilog: example command lines, kept as written (click would
    rewrap them otherwise)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def echo_table(rows: Sequence[Sequence[str]]) -> None:
    """Print ``rows`` (the first is the header) in left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
