"""Topology rules (topic matching, name checks) and the envelope's AMQP form."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import BaseModel

from behaviours import SubscriberBehaviour
from mesh import (
    Agent,
    EnvelopeError,
    Message,
    MessageType,
    Settings,
    TopicError,
    TopologyError,
    on,
    rpc,
    topology,
)
from mesh.devservices import Services
from mesh.envelope import encode_body, from_amqp, to_amqp

# --- topic matching ------------------------------------------------------------------

MATCHES = [
    # exact words
    ("a.b.c", "a.b.c", True),
    ("a.b.c", "a.b", False),
    ("a.b", "a.b.c", False),
    # '*' is exactly one word: at the start, middle and end
    ("*", "a", True),
    ("*", "a.b", False),
    ("*.b.c", "a.b.c", True),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.c", False),
    ("a.*.c", "a.b.x.c", False),
    ("a.b.*", "a.b.c", True),
    ("a.b.*", "a.b", False),
    ("a.*", "a.b.c", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    # '#' is zero or more words
    ("#", "a", True),
    ("#", "a.b.c.d", True),
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c.d.e", True),
    ("a.#", "b.a", False),
    ("#.z", "z", True),
    ("#.z", "a.b.z", True),
    ("#.z", "a.z.b", False),
    ("a.#.z", "a.z", True),
    ("a.#.z", "a.b.z", True),
    ("a.#.z", "a.b.c.d.z", True),
    ("a.#.z", "a.b.c", False),
    ("a.#.z", "b.a.z", False),
    # combinations
    ("*.#", "a", True),
    ("#.*", "a.b.c", True),
    ("*.*.#", "a", False),
    ("#.#", "a.b", True),
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("a.#.*", "a.b.c", True),
    ("vehicle.*.speed", "vehicle.v7.speed", True),
    ("vehicle.*.speed", "vehicle.v7.eu.speed", False),
    ("vehicle.#.speed", "vehicle.v7.eu.speed", True),
    # a word is matched whole, not as a prefix
    ("ab.*", "a.b", False),
    ("a.b", "a.bc", False),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    """``matches`` follows the topic exchange: ``*`` one word, ``#`` zero or more."""
    assert topology.matches(pattern, topic) is expected


async def test_matches_agrees_with_the_broker(settings: Settings) -> None:
    """For every case above, the broker's topic exchange routes exactly as ``matches`` says."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            "test.matches", aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        patterns = sorted({p for p, _, _ in MATCHES})
        queues: dict[str, AbstractQueue] = {}
        for pattern in patterns:
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, pattern)
            queues[pattern] = queue
        topics = sorted({t for _, t, _ in MATCHES})
        for topic in topics:
            # The channel confirms: once publish returns, the broker has routed the message.
            await exchange.publish(aio_pika.Message(topic.encode()), routing_key=topic)
        for pattern, queue in queues.items():
            routed: set[str] = set()
            while (incoming := await queue.get(fail=False, no_ack=True)) is not None:
                routed.add(incoming.body.decode())
            expected = {t for t in topics if topology.matches(pattern, t)}
            assert routed == expected, f"pattern {pattern!r}"


# --- name, topic and pattern checks --------------------------------------------------


@pytest.mark.parametrize("topic", ["a", "vehicle.v7.speed", "a-b.c_d.E9", "x" * 255])
def test_check_topic_accepts_valid_topics(topic: str) -> None:
    """A topic of words of letters, digits, '-' and '_' is returned unchanged."""
    assert topology.check_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("", "must not be empty"),
        ("_req.agent.op", "start with '_'"),
        ("_reply", "start with '_'"),
        ("a..b", "word ''"),
        ("a.b.", "word ''"),
        ("a.*.c", "wildcards are for subscriptions"),
        ("a.#", "word '#'"),
        ("a b.c", "word 'a b'"),
        ("a.b/c", "word 'b/c'"),
        ("x" * 256, "longer than 255"),
    ],
)
def test_check_topic_names_the_problem(topic: str, problem: str) -> None:
    """An invalid topic raises ``TopicError`` whose message says what is wrong."""
    with pytest.raises(TopicError, match="invalid topic") as caught:
        topology.check_topic(topic)
    assert problem in str(caught.value)


@pytest.mark.parametrize("pattern", ["#", "*", "a.*.c", "a.#", "#.z", "*.b.#", "a.b"])
def test_check_pattern_accepts_valid_patterns(pattern: str) -> None:
    """Words, ``*`` and ``#`` make a valid binding pattern."""
    assert topology.check_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("", "must be 1 to 255 bytes"),
        ("a." + "b" * 254, "must be 1 to 255 bytes"),
        ("a..b", "word ''"),
        ("a.b*", "word 'b*'"),
        ("a.#x", "word '#x'"),
        ("a.**", "word '**'"),
        ("a b", "word 'a b'"),
    ],
)
def test_check_pattern_names_the_problem(pattern: str, problem: str) -> None:
    """An invalid pattern raises ``TopicError`` naming the offending word."""
    with pytest.raises(TopicError, match="invalid pattern") as caught:
        topology.check_pattern(pattern)
    assert problem in str(caught.value)


@pytest.mark.parametrize("name", ["a", "agent-1", "A_b-C", "9lives", "x" * 128])
def test_check_name_accepts_valid_names(name: str) -> None:
    """Names of letters, digits, '-' and '_' (not first), up to 128 characters, pass."""
    assert topology.check_name("agent id", name) == name


@pytest.mark.parametrize("name", ["", "-a", "_a", "a.b", "a b", "a*", "x" * 129, "é"])
def test_check_name_names_the_problem(name: str) -> None:
    """An invalid name raises ``TopicError`` naming the kind of name and the value."""
    with pytest.raises(TopicError) as caught:
        topology.check_name("behaviour name", name)
    text = str(caught.value)
    assert f"invalid behaviour name {name!r}" in text
    assert "at most 128 characters" in text


def test_routing_keys_follow_the_contract() -> None:
    """The mesh's own names and routing keys are those docs/architecture.md lists."""
    assert topology.behaviour_queue("v7", "watch") == "mesh.q.v7.watch"
    assert topology.inbox_queue("v7", "i1", 2) == "mesh.i.v7.i1._inbox-2"
    assert topology.request_key("v7", "status") == "_req.v7.status"
    assert topology.reply_key("v7", "i1") == "_reply.v7.i1"
    assert topology.error_key("v7", "i1") == "_err.v7.i1"
    assert topology.control_key(topology.ALL_AGENTS, "ping") == "_ctl._all.ping"
    assert topology.is_request("_req.v7.status")
    assert not topology.is_request("req.v7.status")


# --- the envelope ----------------------------------------------------------------------


class Reading(BaseModel):
    vehicle: str
    speed_kmh: float


@pytest.fixture
async def channel(services: Services) -> AsyncIterator[AbstractChannel]:
    """A channel for exclusive, server-named queues: they vanish with the connection, so
    these tests need no vhost of their own."""
    connection = await aio_pika.connect(services.settings.amqp_url)
    async with connection:
        yield await connection.channel()


async def deliver(channel: AbstractChannel, message: aio_pika.Message) -> AbstractIncomingMessage:
    """Send ``message`` through the real broker and return it as a consumer receives it."""
    queue = await channel.declare_queue(exclusive=True)
    await channel.default_exchange.publish(message, routing_key=queue.name)
    incoming = await queue.get(timeout=5, no_ack=True)
    assert incoming is not None
    return incoming


async def test_envelope_round_trip(channel: AbstractChannel) -> None:
    """``to_amqp`` then delivery then ``from_amqp`` gives back every field the sender set."""
    sent = Message(
        topic="vehicle.v7.speed",
        payload=Reading(vehicle="v7", speed_kmh=88.5),
        type=MessageType.REQUEST,
        app_id="v7",
        instance="i1",
        behaviour="report",
        correlation_id="corr-1",
        reply_to="_reply.v7.i1",
        timestamp=datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC),
        expiration=30.0,
        schema_id="reading/1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        headers={"x-custom": "yes", "priority-hint": 3},
    )
    amqp = to_amqp(sent, user_id="guest")
    assert amqp.content_type == "application/json"
    assert amqp.delivery_mode == aio_pika.DeliveryMode.PERSISTENT

    incoming = await deliver(channel, amqp)
    assert incoming.user_id == "guest"  # the broker accepted the connection's own user
    received = from_amqp(incoming)

    assert received.payload == {"vehicle": "v7", "speed_kmh": 88.5}
    assert Reading.model_validate(received.payload) == sent.payload
    for field in (
        "topic", "type", "message_id", "app_id", "instance", "behaviour", "correlation_id",
        "reply_to", "timestamp", "expiration", "schema_id", "traceparent", "headers",
    ):
        assert getattr(received, field) == getattr(sent, field), field
    assert received.app_id == "v7"
    assert received.delivery_count == 0


async def test_envelope_round_trip_of_a_minimal_event(channel: AbstractChannel) -> None:
    """An event with defaults only survives the trip; the send time is filled in."""
    sent = Message(topic="a.b", payload=[1, "two", None])
    received = from_amqp(await deliver(channel, to_amqp(sent)))
    assert received.topic == "a.b"
    assert received.payload == [1, "two", None]
    assert received.type is MessageType.EVENT
    assert received.message_id == sent.message_id
    assert received.timestamp is not None
    assert received.correlation_id is None
    assert received.reply_to is None
    assert received.expiration is None
    assert received.headers == {}


async def test_to_amqp_with_explicit_body_keeps_it(channel: AbstractChannel) -> None:
    """``body=`` is sent verbatim instead of the encoded payload."""
    sent = Message(topic="a.b", payload={"ignored": True})
    received = from_amqp(await deliver(channel, to_amqp(sent, body=b'{"x": 1}')))
    assert received.payload == {"x": 1}


def test_encode_body_refuses_what_json_cannot_hold() -> None:
    """A payload JSON cannot encode raises ``EnvelopeError``, not a pydantic error."""
    with pytest.raises(EnvelopeError, match="not JSON-serialisable"):
        encode_body(object())
    assert encode_body(Reading(vehicle="v", speed_kmh=1)) == b'{"vehicle":"v","speed_kmh":1.0}'


async def test_from_amqp_refuses_a_body_that_is_not_json(channel: AbstractChannel) -> None:
    """A delivered message whose body is not JSON raises ``EnvelopeError`` saying so."""
    incoming = await deliver(
        channel, aio_pika.Message(b"{not json", content_type="application/json", type="event")
    )
    with pytest.raises(EnvelopeError, match="body is not JSON"):
        from_amqp(incoming)


async def test_from_amqp_refuses_another_content_type(channel: AbstractChannel) -> None:
    """A message that is not ``application/json`` raises ``EnvelopeError`` naming its type."""
    incoming = await deliver(channel, aio_pika.Message(b"<x/>", content_type="text/xml"))
    with pytest.raises(EnvelopeError, match="'text/xml'"):
        from_amqp(incoming)


async def test_from_amqp_refuses_an_unknown_type(channel: AbstractChannel) -> None:
    """A message type outside event/request/reply/error/control raises ``EnvelopeError``."""
    incoming = await deliver(
        channel, aio_pika.Message(b"{}", content_type="application/json", type="gossip")
    )
    with pytest.raises(EnvelopeError, match="unknown message type 'gossip'"):
        from_amqp(incoming)


async def test_queue_declared_differently_before_names_the_conflict(settings: Settings) -> None:
    """An agent whose queue exists with other arguments and holds a message fails with a
    TopologyError naming the queue, the argument and the way through (an empty one is
    re-created: tests/test_upgrade.py)."""

    class Old(Agent):
        @rpc("status")
        async def status(self, msg: Message, _: object) -> dict[str, str]:
            return {}

    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            "mesh.q.old.rpc", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), "mesh.q.old.rpc")
    agent = Old("old", settings=settings)
    try:
        conflict = r"mesh\.q\.old\.rpc.*inequivalent arg.*--migrate-queues"
        with pytest.raises(TopologyError, match=conflict):
            await agent.start()
    finally:
        await agent.stop()


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("a.*", "a.b", True),
        ("a.#", "b.#", False),
        ("a.*.c", "a.b.*", True),
        ("a.*", "a.*.c", False),
        ("a.#.c", "a.c", True),
        ("x.y", "x.z", False),
        ("*.#", "a", True),
        ("#", "#", True),
    ],
)
def test_overlap_says_whether_some_topic_matches_both(
    first: str, second: str, expected: bool
) -> None:
    assert topology.overlap(first, second) is expected
    assert topology.overlap(second, first) is expected


def test_overlapping_patterns_in_one_behaviour_are_warned_about() -> None:
    """Only the first matching ``@on`` handler runs: two overlapping patterns say which."""
    with pytest.warns(UserWarning, match=r"'vehicle.\*.speed' \(a\) and 'vehicle.v7.#' \(b\)"):

        class Both(SubscriberBehaviour):
            @on("vehicle.*.speed")
            async def a(self, msg: Message, payload: object) -> None: ...

            @on("vehicle.v7.#")
            async def b(self, msg: Message, payload: object) -> None: ...
