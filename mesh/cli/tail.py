"""``mesh tail``: watch the events on ``mesh.topic`` as they pass."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import click
from aio_pika.abc import AbstractIncomingMessage

from mesh import topology
from mesh.agent import Agent
from mesh.cli.common import example, with_client
from mesh.envelope import EnvelopeError, from_amqp
from mesh.topology import TopicError

MAX_LENGTH = 10_000
"""The most messages a tail's queue keeps for a terminal that falls behind."""

PREFETCH = 100

QUEUE_ARGUMENTS = {
    "x-queue-type": "classic",  # explicit: a vhost may default to quorum, never exclusive
    "x-max-length": MAX_LENGTH,
    "x-overflow": "drop-head",
}
"""No dead-letter exchange: what a tail drops is a copy nobody else needs."""


def record(incoming: AbstractIncomingMessage, received: datetime) -> dict[str, Any]:
    """What ``--json`` prints for one delivered message."""
    fields: dict[str, Any] = {
        "time": received.isoformat(timespec="milliseconds"),
        "topic": incoming.routing_key or "",
        "sender": incoming.app_id,
        "instance": None,
        "user": None,
        "message_id": incoming.message_id,
        "type": incoming.type,
        "size": len(incoming.body),
        "headers": {},
        "payload": None,
    }
    try:
        message = from_amqp(incoming)
    except EnvelopeError as exc:
        body = incoming.body.decode("utf-8", "replace")
        return fields | {"error": str(exc), "body": body}
    return fields | {
        "topic": message.topic,
        "instance": message.instance,
        "user": message.user_id,
        "message_id": message.message_id,
        "type": message.type.value,
        "headers": message.headers,
        "payload": message.payload,
    }


def line(fields: dict[str, Any], received: datetime, with_payload: bool) -> str:
    """What ``mesh tail`` prints for one delivered message, without ``--json``."""
    if "error" in fields:
        sender = f"(not a mesh message: {fields['error']})"
        body = fields["body"]
    else:
        sender = f"{fields['sender'] or '?'}/{fields['instance'] or '?'}"
        if fields["user"]:
            sender += f" (user {fields['user']})"
        body = _json(fields["payload"])
    parts = [received.strftime("%H:%M:%S.%f")[:-3], fields["topic"], sender, f"{fields['size']} B"]
    if with_payload:
        parts.append(body)
    return "  ".join(parts)


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    # Header values AMQP decoded into types JSON lacks (bytes, Decimal, datetime).
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


async def _tail(
    client: Agent,
    *,
    patterns: tuple[str, ...],
    as_json: bool,
    with_payload: bool,
    count: int | None,
    timeout: float | None,
) -> int:
    # A channel of its own, so that the prefetch window below bounds what waits in this
    # process: the backlog of a slow terminal stays in the length-limited queue.
    channel = await client.transport.open_channel(PREFETCH, confirms=False)
    # aio-pika names the queue (amq_<uuid>) so that its robust channel can declare it,
    # its bindings and its consumer again after a reconnection.
    queue = await channel.declare_queue(
        exclusive=True, auto_delete=True, arguments=QUEUE_ARGUMENTS
    )
    for pattern in patterns:
        await queue.bind(topology.TOPIC_EXCHANGE, pattern)
    arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(arrived.put)
    click.echo(
        f"tailing {topology.TOPIC_EXCHANGE} {' '.join(patterns)} on queue {queue.name} "
        f"(keeps the newest {MAX_LENGTH}; Ctrl+C stops)",
        err=True,
    )
    shown = 0
    while count is None or shown < count:
        try:
            async with asyncio.timeout(timeout):
                incoming = await arrived.get()
        except TimeoutError:
            break
        received = datetime.now().astimezone()
        fields = record(incoming, received)
        click.echo(_json(fields) if as_json else line(fields, received, with_payload))
        await incoming.ack()
        shown += 1
    return shown


def _patterns(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    try:
        return tuple(topology.check_pattern(p) for p in values) or ("#",)
    except TopicError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(
    epilog=example(
        "mesh tail",
        "mesh tail 'vehicle.*.speed' 'alerts.#' --payload",
        "mesh tail --json --count 1 --timeout 10 orders.created",
    )
)
@click.argument("patterns", nargs=-1, metavar="[PATTERN]...", callback=_patterns)
@click.option("--payload", "with_payload", is_flag=True, help="Show each message's JSON body.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per line: time, topic, sender, instance, user, message_id, type, "
    "size, headers, payload.",
)
@click.option(
    "--count", type=click.IntRange(min=1), metavar="N", help="Stop after N messages."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Stop after this long without a message.",
)
def tail(
    patterns: tuple[str, ...],
    with_payload: bool,
    as_json: bool,
    count: int | None,
    timeout: float | None,
) -> None:
    """Show live messages on mesh.topic matching PATTERN (binding keys; default #).

    Each message is one line: local time, topic, sender (agent/instance, and the user
    the broker verified), body size, and with --payload the JSON body. With --count,
    exits 1 if --timeout passes before N messages came.

    The tail reads a queue of its own, deleted when it ends, that keeps at most the
    newest 10000 messages: when the terminal falls behind, the oldest are dropped, not
    dead-lettered (a tail's copy is disposable; the agents' own queues lose nothing).
    """
    try:
        shown = with_client(
            lambda client: _tail(
                client,
                patterns=patterns,
                as_json=as_json,
                with_payload=with_payload,
                count=count,
                timeout=timeout,
            )
        )
    except KeyboardInterrupt:
        return
    if count is not None and shown < count:
        raise click.ClickException(
            f"no message for {timeout:g}s: {shown} of {count} shown"
        )
