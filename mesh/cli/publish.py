"""``mesh publish``: publish events through the gateway from a shell."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any, TextIO

import click

from mesh import topology
from mesh.agent import Agent
from mesh.cli.common import example, with_client
from mesh.envelope import RESERVED_HEADERS
from mesh.topology import TopicError


def _headers(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    headers: dict[str, str] = {}
    for value in values:
        key, equals, text = value.partition("=")
        if not key or not equals:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE")
        # The gateway drops these from a sender, so setting one here would only mislead.
        if key in RESERVED_HEADERS or key.startswith("x-mesh-"):
            raise click.BadParameter(f"{key!r} is set by the mesh, not by a sender")
        headers[key] = text
    return headers


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} is not JSON: {exc}") from None


async def _lines(stream: TextIO) -> AsyncIterator[str]:
    """The lines of ``stream`` as they come.

    A daemon thread reads them: a read blocked on a terminal would keep an executor
    thread, and with it the process, alive after Ctrl+C.
    """
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue(maxsize=64)

    def read() -> None:
        try:
            for line in stream:
                asyncio.run_coroutine_threadsafe(lines.put(line), loop).result()
            asyncio.run_coroutine_threadsafe(lines.put(None), loop).result()
        except RuntimeError:  # the loop closed: the command has ended
            return

    threading.Thread(target=read, name="stdin", daemon=True).start()
    while (line := await lines.get()) is not None:
        yield line


async def _publish_lines(
    client: Agent, topic: str, stream: TextIO, headers: dict[str, str], schema: str | None
) -> None:
    number = 0
    async for line in _lines(stream):
        number += 1
        if line.strip():
            payload = _json(line, f"line {number}")
            click.echo(await client.publish(topic, payload, headers=headers, schema=schema))


@click.command(
    epilog=example(
        "mesh publish vehicle.v7.speed '{\"vehicle\": \"v7\", \"speed_kmh\": 88}'",
        "echo '{\"speed_kmh\": 88}' | mesh publish vehicle.v7.speed - --header source=test",
        "mesh publish vehicle.v7.speed --jsonl < readings.jsonl",
        "mesh publish vehicle.v7.speed '{\"vehicle\": \"v7\", \"speed_kmh\": 88}' "
        "--schema reading@1",
    )
)
@click.argument("topic")
@click.argument("payload", required=False)
@click.option(
    "--jsonl",
    is_flag=True,
    help="Publish one message per line of stdin (blank lines skipped), printing one id per line.",
)
@click.option(
    "--header",
    "headers",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_headers,
    help="Add a header (repeatable).",
)
@click.option(
    "--schema",
    default=None,
    metavar="NAME@VERSION",
    help="The schema version the payload follows (x-mesh-schema), where the policy asks.",
)
def publish(
    topic: str, payload: str | None, jsonl: bool, headers: dict[str, str], schema: str | None
) -> None:
    """Publish PAYLOAD (JSON, default {}; - reads stdin) to TOPIC through the gateway.

    Prints the message id once the broker has confirmed the message.
    """
    try:
        topology.check_topic(topic)
    except TopicError as exc:
        raise click.BadParameter(str(exc), param_hint="'TOPIC'") from None
    if jsonl:
        if payload not in (None, "-"):
            raise click.UsageError("--jsonl reads the payloads from stdin: give no PAYLOAD")
        with_client(lambda client: _publish_lines(client, topic, sys.stdin, headers, schema))
        return
    text = sys.stdin.read() if payload == "-" else payload or "{}"
    body = _json(text, "payload")
    click.echo(
        with_client(lambda client: client.publish(topic, body, headers=headers, schema=schema))
    )
