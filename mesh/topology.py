"""Names of the mesh's exchanges, queues and routing keys, and their declarations.

The names are part of the public contract (see docs/architecture.md); everything that builds one
goes through this module.
"""

from __future__ import annotations

import logging
import operator
import re
from functools import cache, lru_cache
from itertools import accumulate
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustQueue,
)
from aio_pika.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

logger = logging.getLogger(__name__)

POLICY_EXCHANGE = "mesh.policy"
TOPIC_EXCHANGE = "mesh.topic"
GATEWAY_QUEUE = "mesh.gateway"
INTERNAL_POLICY_EXCHANGE = "mesh.policy.internal"
INTERNAL_EXCHANGE = "mesh.internal"
INTERNAL_GATEWAY_QUEUE = "mesh.gateway.internal"
DEAD_LETTER_EXCHANGE = "mesh.dlx"
DEAD_LETTER_QUEUE = "mesh.dead"
DEAD_LETTER_INCOMING = "mesh.dead.incoming"
FILING_EXCHANGE = "mesh.dead.filing"
"""Fanout to the ``mesh.dead`` stream; a filed dead letter keeps its original routing key."""

BACKSTOP_DELIVERIES = 100
"""The broker's own delivery limit on behaviour queues: far above any ``max_deliveries``.

Before RabbitMQ 4.3 every hand-back (a nack on stop, a closed channel) raises a quorum
queue's delivery count, so it cannot count failures; the mesh counts those itself
(``x-mesh-attempt``).  This limit only catches a message that keeps killing its consumer
before the consumer can settle it.
"""

RETIRED_EXCHANGES = frozenset({"mesh.retry", "mesh.requeue"})
"""Exchanges earlier versions declared and nothing publishes to any more (retries used to
share them; each agent has a retry path of its own now).  A binding to one is left alone:
an agent's user may not touch them, and on a newer broker they do not exist."""

INTERNAL_TTL_MS = 60_000
"""The longest the mesh's own traffic waits for a gateway: requests, replies and control
carry shorter expirations of their own; a registry event older than this is stale."""

ALL_AGENTS = "_all"
"""Agent id that control commands use to address every agent at once."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_WORD = re.compile(r"^[A-Za-z0-9_-]+$")
_PATTERN_WORD = re.compile(r"^(?:[A-Za-z0-9_-]+|\*|#)$")


class TopicError(ValueError):
    """A topic, binding pattern or name does not follow the mesh's rules."""


class TopologyError(RuntimeError):
    """The broker holds a mesh object declared differently (by an older version, say)."""


class QueueMismatch(TopologyError):
    """A queue exists with other arguments than this version declares.

    A behaviour's queue is upgraded on the spot (see ``mesh.upgrade``); elsewhere this is
    the error the user sees.
    """

    def __init__(self, name: str, arguments: dict[str, Any], broker_says: str) -> None:
        super().__init__(
            f"queue {name!r} exists with other arguments than this version declares "
            f"({broker_says}); it was declared by another version or configuration: drain "
            f"and delete it (rabbitmqctl delete_queue {name}) so it can be declared again"
        )
        self.name = name
        self.arguments = arguments
        self.broker_says = broker_says


async def _declare_queue(channel: AbstractChannel, name: str, **kwargs: Any) -> AbstractQueue:
    try:
        return await channel.declare_queue(name, **kwargs)
    except ChannelPreconditionFailed as exc:
        # "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue ...": the
        # broker names the argument, which is what the user needs to see.
        broker_says = str(exc.args[1] if len(exc.args) > 1 else exc)
        raise QueueMismatch(name, dict(kwargs.get("arguments") or {}), broker_says) from None


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it can be one word of a routing key, else raise ``TopicError``."""
    if not _NAME.match(name):
        raise TopicError(
            f"invalid {kind} {name!r}: use letters, digits, '-' and '_' "
            "(not first), at most 128 characters"
        )
    return name


def check_topic(topic: str) -> str:
    """Return ``topic`` if a user may publish to it, else raise ``TopicError``."""
    if not topic or topic.startswith("_"):
        raise TopicError(f"invalid topic {topic!r}: must not be empty or start with '_'")
    if len(topic) > 255:
        raise TopicError(f"invalid topic {topic[:40]!r}…: longer than 255 bytes")
    for word in topic.split("."):
        if not _WORD.match(word):
            raise TopicError(
                f"invalid topic {topic!r}: word {word!r} must be letters, digits, '-' or '_' "
                "(wildcards are for subscriptions)"
            )
    return topic


def check_pattern(pattern: str) -> str:
    """Return ``pattern`` if a user may bind it (words, ``*`` and ``#``; no ``_`` prefix)."""
    if pattern.startswith("_"):
        raise TopicError(
            f"invalid pattern {pattern!r}: routing keys starting with '_' belong to the mesh "
            "(requests, replies, control); use @rpc for requests"
        )
    return check_binding(pattern)


def check_binding(pattern: str) -> str:
    """Return ``pattern`` if it is a valid binding key (words, ``*`` and ``#``)."""
    if not pattern or len(pattern) > 255:
        raise TopicError(f"invalid pattern {pattern!r}: must be 1 to 255 bytes")
    for word in pattern.split("."):
        if not _PATTERN_WORD.match(word):
            raise TopicError(
                f"invalid pattern {pattern!r}: word {word!r} must be a word, '*' or '#'"
            )
    return pattern


@lru_cache(maxsize=8192)  # handlers see the same few topics over and over
def matches(pattern: str, topic: str) -> bool:
    """Whether a topic exchange would route ``topic`` to a binding ``pattern``."""
    if pattern == "#":
        return True
    if "*" not in pattern and "#" not in pattern:
        return pattern == topic
    return _words_match(pattern.split("."), topic.split("."))


def overlap(first: str, second: str) -> bool:
    """Whether some topic matches both binding patterns."""
    a, b = first.split("."), second.split(".")

    @cache
    def common(i: int, j: int) -> bool:
        # Whether a[i:] and b[j:] can match one and the same sequence of words.
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == "#":
            return common(i + 1, j) or (j < len(b) and common(i, j + 1))
        if j < len(b) and b[j] == "#":
            return common(i, j + 1) or (i < len(a) and common(i + 1, j))
        if i < len(a) and j < len(b) and (a[i] == b[j] or "*" in (a[i], b[j])):
            return common(i + 1, j + 1)
        return False

    return common(0, 0)


def _words_match(pattern: list[str], words: list[str]) -> bool:
    # reach[j]: the pattern words seen so far can match the first j topic words.
    # One pass per pattern word keeps this linear in each, however many '#' there are.
    reach = [True] + [False] * len(words)
    for word in pattern:
        if word == "#":
            reach = list(accumulate(reach, operator.or_))
        else:
            reach = [False] + [reach[j] and word in ("*", words[j]) for j in range(len(words))]
    return reach[-1]


def behaviour_queue(agent: str, behaviour: str) -> str:
    """The quorum queue shared by all replicas of ``agent`` for one behaviour."""
    return f"mesh.q.{agent}.{behaviour}"


def inbox_queue(agent: str, instance: str, connection: int) -> str:
    """The exclusive queue of one agent instance on one connection: replies, errors, control.

    Each connection gets a name of its own: after a network cut the broker may hold the
    old connection (and its exclusive queue) until its heartbeat times out, and the new
    connection must not wait for that.  ``_`` keeps it apart from behaviour names.
    """
    return f"mesh.i.{agent}.{instance}._inbox-{connection}"


def broadcast_queue(agent: str, instance: str, behaviour: str) -> str:
    """The queue of a broadcast-mode behaviour in one instance."""
    return f"mesh.i.{agent}.{instance}.{behaviour}"


def retry_exchange(agent: str) -> str:
    """Where ``agent``'s behaviours publish retry copies (its own: see ``declare_retry_path``)."""
    return f"mesh.q.{agent}._retry"


def retry_queue(agent: str, delay_ms: int) -> str:
    """The queue that holds ``agent``'s retried messages for ``delay_ms`` before they go back."""
    return f"mesh.q.{agent}._retry.{delay_ms}"


def requeue_exchange(agent: str) -> str:
    """Where ``agent``'s retried messages come back; its queues are bound by name."""
    return f"mesh.q.{agent}._requeue"


def requeue_key(queue: str) -> str:
    """The binding on its agent's requeue exchange that brings ``queue``'s retries back."""
    return f"*.{queue}"


def retry_key(delay_ms: int, queue: str) -> str:
    """Routing key of a retry copy: which delay, and which queue the message returns to."""
    return f"{delay_ms}.{queue}"


def request_key(agent: str, operation: str) -> str:
    return f"_req.{agent}.{operation}"


def reply_key(agent: str, instance: str) -> str:
    return f"_reply.{agent}.{instance}"


def error_key(agent: str, instance: str) -> str:
    return f"_err.{agent}.{instance}"


def control_key(agent: str, command: str) -> str:
    return f"_ctl.{agent}.{command}"


def registry_key(event: str) -> str:
    return f"_registry.{event}"


def is_request(routing_key: str) -> bool:
    return routing_key.startswith("_req.")


def is_internal(routing_key: str) -> bool:
    """Whether ``routing_key`` is the mesh's own (requests, replies, control, registry)."""
    return routing_key.startswith("_")


def policy_exchange(routing_key: str) -> str:
    """Where an agent sends a message with ``routing_key``: the lane its kind travels."""
    return INTERNAL_POLICY_EXCHANGE if is_internal(routing_key) else POLICY_EXCHANGE


def delivery_exchange(routing_key: str) -> str:
    """Where the gateway delivers ``routing_key`` and receivers bind it."""
    return INTERNAL_EXCHANGE if is_internal(routing_key) else TOPIC_EXCHANGE


SHARED_EXCHANGES = (
    POLICY_EXCHANGE,
    TOPIC_EXCHANGE,
    INTERNAL_POLICY_EXCHANGE,
    INTERNAL_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
)
"""The exchanges every agent publishes to or binds on."""


async def declare_exchanges(
    channel: AbstractChannel,
    *,
    dead_letter_max_bytes: int = 1_000_000_000,
    dead_letter_max_age: str = "7D",
) -> dict[str, AbstractExchange]:
    """Declare the mesh's exchanges, the gateway queue and the dead-letter stream (idempotent)."""
    exchanges = {
        name: await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        for name in SHARED_EXCHANGES
    }
    gateway = await declare_gateway_queue(channel)
    await gateway.bind(exchanges[POLICY_EXCHANGE], "#")
    internal = await declare_internal_gateway_queue(channel)
    await internal.bind(exchanges[INTERNAL_POLICY_EXCHANGE], "#")
    filing = await channel.declare_exchange(
        FILING_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    exchanges[FILING_EXCHANGE] = filing
    incoming = await declare_dead_letter_incoming(channel)
    await incoming.bind(exchanges[DEAD_LETTER_EXCHANGE], "#")
    # Last: a declare the broker refuses closes the channel.
    try:
        stream = await declare_dead_letter_stream(
            channel, dead_letter_max_bytes, dead_letter_max_age
        )
    except QueueMismatch as mismatch:
        # One stream serves the whole mesh, and deleting it would lose its dead letters: the
        # retention it was declared with stands, and this process goes on with it.
        logger.warning(
            "%s exists with other retention than MESH_DEAD_LETTER_MAX_BYTES/_AGE ask "
            "(%s); kept as it is, nothing lost. To apply the new settings, delete it once its "
            "dead letters are no longer needed (rabbitmqctl delete_queue %s) and start a "
            "gateway",
            DEAD_LETTER_QUEUE,
            mismatch.broker_says,
            DEAD_LETTER_QUEUE,
        )
        return exchanges
    await stream.bind(filing)
    return exchanges


async def check_exchanges(channel: AbstractChannel) -> None:
    """Check, without declaring, that the exchanges agents use exist.

    What a provisioned agent does instead of ``declare_exchanges``: its broker user may not
    declare the topology (provisioning and the gateway do).  Raises ``TopologyError`` naming
    a missing one.
    """
    for name in SHARED_EXCHANGES:
        try:
            await channel.get_exchange(name, ensure=True)
        except ChannelNotFoundEntity:
            raise TopologyError(
                f"exchange {name!r} does not exist and this agent's broker user may not declare "
                "it: run `mesh provision` or start a gateway first"
            ) from None


async def declare_dead_letter_incoming(channel: AbstractChannel) -> AbstractQueue:
    """``mesh.dead.incoming``: where ``mesh.dlx`` delivers, until a gateway files it in the
    ``mesh.dead`` stream.

    RabbitMQ 3.10 drops what its queues dead-letter into a stream (tried: a full queue's
    drop-head, a reject), so dead letters wait in a quorum queue first; the gateway's
    ``DeadLetterFiler`` moves them on (confirmed, then acked) and counts them.
    """
    return await _declare_queue(
        channel, DEAD_LETTER_INCOMING, durable=True, arguments={"x-queue-type": "quorum"}
    )


async def declare_dead_letter_stream(
    channel: AbstractChannel, max_bytes: int, max_age: str
) -> AbstractQueue:
    """``mesh.dead``: a stream, so it is bounded by size and age and read by offset.

    Filled by the gateway from ``mesh.dead.incoming`` (see ``declare_dead_letter_incoming``).

    A stream keeps what it holds for every reader (listing, showing and redriving a dead
    letter never consumes it) and drops its oldest segments past ``max_bytes`` or
    ``max_age``, so a broken agent cannot fill the broker's disk.
    """
    segment = max(min(max_bytes // 10, 100_000_000), 100_000)
    return await _declare_queue(
        channel,
        DEAD_LETTER_QUEUE,
        durable=True,
        arguments={
            "x-queue-type": "stream",
            "x-max-length-bytes": max_bytes,
            "x-max-age": max_age,
            "x-stream-max-segment-size-bytes": segment,
        },
    )


async def declare_gateway_queue(channel: AbstractChannel) -> AbstractQueue:
    """The queue gateway replicas compete on (declared, so a robust channel restores it)."""
    return await _declare_queue(
        channel,
        GATEWAY_QUEUE,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
    )


async def declare_internal_gateway_queue(channel: AbstractChannel) -> AbstractQueue:
    """The queue gateway replicas compete on for the mesh's own traffic.

    Classic, not quorum: requests, replies and control expire with their caller's timeout
    and are never retried, so a replicated log buys nothing and costs a Raft commit on
    every hop of a round trip.  No dead-letter exchange: what expires here is dropped
    (its caller already timed out); the relay dead-letters what it cannot handle itself.
    """
    return await _declare_queue(
        channel,
        INTERNAL_GATEWAY_QUEUE,
        durable=True,
        arguments={"x-queue-type": "classic", "x-message-ttl": INTERNAL_TTL_MS},
    )


QUEUE_TYPES = ("quorum", "classic")


def behaviour_queue_args(queue_type: str, max_length: int) -> dict[str, Any]:
    """A behaviour queue's arguments: its type, and a length past which the oldest go.

    ``drop-head``, not ``reject-publish``: a queue that refused a message would nack the
    gateway's whole publish, and every other subscriber of the topic would wait behind
    one departed agent.  Dropped messages are dead-lettered (at most once) with the
    reason ``maxlen``.
    """
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue type {queue_type!r} is not one of {', '.join(QUEUE_TYPES)}")
    arguments: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-max-length": max_length,
        "x-overflow": "drop-head",
    }
    if queue_type == "quorum":
        arguments["x-delivery-limit"] = BACKSTOP_DELIVERIES
    return arguments


async def declare_shared_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> AbstractQueue:
    """Declare a behaviour's queue, shared by the agent's replicas.

    Declaring binds nothing: ``bindings.reconcile`` binds what the behaviour declares
    (each durable binding is a broker transaction, so binding twice slows every start).
    """
    return await _declare_queue(channel, name, durable=True, arguments=arguments)


async def declare_broadcast_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any], expires: float
) -> AbstractQueue:
    """Declare one instance's queue for a broadcast-mode behaviour.

    Not exclusive and not auto-delete: stopping the behaviour or losing the connection
    must not delete what it was delivered.  The broker deletes it once nothing used it
    for ``expires`` seconds (its instance is gone).
    """
    arguments = arguments | {"x-expires": int(expires * 1000)}
    return await _declare_queue(channel, name, durable=True, arguments=arguments)


async def declare_request_queue(
    channel: AbstractChannel, name: str, expires: float
) -> AbstractQueue:
    """Declare the classic queue an agent's replicas share for its ``@rpc`` operations.

    Requests are short-lived: each expires with its caller's timeout, and a failing
    handler answers instead of being retried.  Keeping them in a replicated log would buy
    nothing after a broker crash (the caller has given up by then) and costs a Raft commit
    on the round trip.  No dead-letter exchange: an expired request is not a dead letter
    (its caller already got a timeout), so the broker drops it.  Once no instance has
    consumed it for ``expires`` seconds the agent is gone, and the broker deletes it.
    """
    return await _declare_queue(
        channel,
        name,
        durable=True,
        arguments={"x-queue-type": "classic", "x-expires": int(expires * 1000)},
    )


async def declare_inbox(
    channel: AbstractRobustChannel, name: str, patterns: list[str]
) -> AbstractRobustQueue:
    """Declare an instance's exclusive inbox bound to ``mesh.internal``.

    Not restored by the robust channel: a new connection gets a new inbox (see
    ``inbox_queue``).  Replies and control commands expire with their sender's timeout;
    an expired one is dropped, not dead-lettered.
    """
    queue = await channel.declare_queue(name, exclusive=True, auto_delete=True, robust=False)
    for pattern in patterns:
        await queue.bind(delivery_exchange(pattern), pattern, robust=False)
    return queue


async def declare_requeue_exchange(channel: AbstractChannel, agent: str) -> AbstractExchange:
    """Declare ``agent``'s requeue exchange, where its retried messages come back.

    A retry copy whose queue is gone (deleted, or a broadcast queue that expired) would
    otherwise wait in its delay queue for ever: at-least-once dead-lettering keeps what it
    cannot route.  The alternate exchange sends it to ``mesh.dlx`` instead.
    """
    return await channel.declare_exchange(
        requeue_exchange(agent),
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": DEAD_LETTER_EXCHANGE},
    )


async def declare_retry_path(channel: AbstractChannel, agent: str, delay_ms: int) -> None:
    """Declare ``agent``'s retry exchange and its queue for ``delay_ms`` milliseconds.

    A retried message is published to the agent's ``…._retry`` exchange with the key
    ``<delay>.<queue>``; it waits in ``…._retry.<delay>`` until its TTL runs out, and the
    broker dead-letters it to the agent's ``…._requeue`` exchange under the same key,
    where the queue it failed in is bound by name.  Dead-lettering is at-least-once (the
    broker keeps the message until the behaviour queue confirmed it), so a broker failure
    mid-way duplicates rather than loses it.

    Why per agent, under its own queue prefix: RabbitMQ's permissions name resources, not
    kinds, so an agent may declare an exchange under its prefix; with a *shared* retry
    exchange as its alternate exchange that routed any key past the gateway into any
    agent's queue.  Each agent's path is its own, and nobody else may write to it.
    """
    exchange = await channel.declare_exchange(
        retry_exchange(agent), aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await _declare_queue(
        channel,
        retry_queue(agent, delay_ms),
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": requeue_exchange(agent),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    await queue.bind(exchange, f"{delay_ms}.#")
