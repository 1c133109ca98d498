"""Names of the mesh's exchanges, queues and routing keys, and their declarations.

The names are part of the public contract (see DESIGN.md); everything that builds one
goes through this module.
"""

from __future__ import annotations

import operator
import re
from functools import lru_cache
from itertools import accumulate
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aio_pika.exceptions import ChannelPreconditionFailed

POLICY_EXCHANGE = "mesh.policy"
TOPIC_EXCHANGE = "mesh.topic"
GATEWAY_QUEUE = "mesh.gateway"
DEAD_LETTER_EXCHANGE = "mesh.dlx"
DEAD_LETTER_QUEUE = "mesh.dead"

ALL_AGENTS = "_all"
"""Agent id that control commands use to address every agent at once."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_WORD = re.compile(r"^[A-Za-z0-9_-]+$")
_PATTERN_WORD = re.compile(r"^(?:[A-Za-z0-9_-]+|\*|#)$")


class TopicError(ValueError):
    """A topic, binding pattern or name does not follow the mesh's rules."""


class TopologyError(RuntimeError):
    """The broker holds a mesh object declared differently (by an older version, say)."""


async def _declare_queue(channel: AbstractChannel, name: str, **kwargs: Any) -> AbstractQueue:
    try:
        return await channel.declare_queue(name, **kwargs)
    except ChannelPreconditionFailed as exc:
        raise TopologyError(
            f"queue {name!r} already exists with other arguments than {kwargs.get('arguments')} "
            f"({exc}); it was declared by another version or configuration: drain and delete "
            f"it (rabbitmqctl delete_queue {name}) so it can be declared again"
        ) from None


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


def inbox_queue(agent: str, instance: str) -> str:
    """The exclusive queue of one agent instance: replies, errors and control."""
    return f"mesh.i.{agent}.{instance}"


def broadcast_queue(agent: str, instance: str, behaviour: str) -> str:
    """The exclusive queue of a broadcast-mode behaviour in one instance."""
    return f"mesh.i.{agent}.{instance}.{behaviour}"


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


async def declare_exchanges(channel: AbstractChannel) -> dict[str, AbstractExchange]:
    """Declare the mesh's three exchanges and the gateway and dead-letter queues (idempotent)."""
    policy = await channel.declare_exchange(
        POLICY_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    topic = await channel.declare_exchange(
        TOPIC_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dlx = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    gateway = await declare_gateway_queue(channel)
    await gateway.bind(policy, "#")
    dead = await _declare_queue(
        channel, DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead.bind(dlx, "#")
    return {POLICY_EXCHANGE: policy, TOPIC_EXCHANGE: topic, DEAD_LETTER_EXCHANGE: dlx}


async def declare_gateway_queue(channel: AbstractChannel) -> AbstractQueue:
    """The queue gateway replicas compete on (declared, so a robust channel restores it)."""
    return await _declare_queue(channel, GATEWAY_QUEUE, durable=True, arguments=_quorum_args())


def _quorum_args(delivery_limit: int | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }
    if delivery_limit is not None:
        args["x-delivery-limit"] = delivery_limit
    return args


async def declare_shared_queue(
    channel: AbstractChannel, name: str, patterns: list[str], max_deliveries: int
) -> AbstractQueue:
    """Declare a behaviour's quorum queue bound to ``mesh.topic`` with ``patterns``.

    The broker's delivery limit sits one above ``max_deliveries``: the behaviour
    dead-letters with a reason at ``max_deliveries``; the broker's limit only catches a
    message that keeps killing its consumer before it can be handled.
    """
    queue = await _declare_queue(
        channel, name, durable=True, arguments=_quorum_args(delivery_limit=max_deliveries + 1)
    )
    for pattern in patterns:
        await queue.bind(TOPIC_EXCHANGE, pattern)
    return queue


async def declare_request_queue(
    channel: AbstractChannel, name: str, patterns: list[str]
) -> AbstractQueue:
    """Declare the classic queue an agent's replicas share for its ``@rpc`` operations.

    Requests are short-lived: each expires with its caller's timeout, and a failing
    handler answers instead of being retried.  Keeping them in a replicated log would buy
    nothing after a broker crash (the caller has given up by then) and costs a Raft commit
    on the round trip.
    """
    queue = await _declare_queue(
        channel,
        name,
        durable=True,
        arguments={"x-queue-type": "classic", "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
    )
    for pattern in patterns:
        await queue.bind(TOPIC_EXCHANGE, pattern)
    return queue


async def declare_private_queue(
    channel: AbstractChannel, name: str, patterns: list[str]
) -> AbstractQueue:
    """Declare an instance's exclusive, auto-delete queue bound to ``mesh.topic``."""
    queue = await _declare_queue(
        channel,
        name,
        exclusive=True,
        auto_delete=True,
        arguments={"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
    )
    for pattern in patterns:
        await queue.bind(TOPIC_EXCHANGE, pattern)
    return queue
