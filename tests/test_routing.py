"""Events end to end: publisher → mesh.policy → gateway → mesh.topic → subscriber behaviours."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from agents_core import Recorder, broker, recorder, take_until
from helpers import running, take

from behaviours import SubscriberBehaviour
from mesh import Agent, Message, Settings, TopicError, on
from mesh.gateway import Gateway

END = "vehicle.end.speed"
"""A topic every subscriber below receives: published last, it marks the end of a run."""


class AnySpeed(SubscriberBehaviour):
    @on("#.speed")
    async def speed(self, msg: Message, payload: object) -> None:
        recorder(self).received.put_nowait((self.name, msg))


class Fleet(SubscriberBehaviour):
    @on("vehicle.#")
    async def anything(self, msg: Message, payload: object) -> None:
        recorder(self).received.put_nowait((self.name, msg))


class OneVehicle(SubscriberBehaviour):
    @on("vehicle.*.speed")
    async def speed(self, msg: Message, payload: object) -> None:
        recorder(self).received.put_nowait((self.name, msg))


class Dashboard(Recorder):
    behaviours = [AnySpeed, Fleet]


class Alerts(Recorder):
    behaviours = [OneVehicle]


async def test_wildcards_route_to_behaviours_in_different_agents(settings: Settings) -> None:
    """``*`` matches one word and ``#`` zero or more; each behaviour gets what it is bound to."""
    dashboard = Dashboard("dashboard", settings=settings)
    alerts = Alerts("alerts", settings=settings)
    publisher = Agent("publisher", settings=settings)
    async with running(Gateway(settings=settings), dashboard, alerts, publisher):
        topics = [
            "vehicle.v1.speed",
            "vehicle.v1.eu.speed",
            "vehicle",
            "vehicle.v2.fuel",
            "speed",
            "nobody.listens",
            "vehiclex.v1.speed",
        ]
        for topic in topics:
            await publisher.publish(topic, {"topic": topic})
        await publisher.publish(END, {"topic": END})

        # Dashboard's two behaviours each see END once; Alerts' one behaviour sees it once.
        dash_items: list[tuple[str, Message]] = []
        while sum(1 for _, m in dash_items if m.topic == END) < 2:
            dash_items += await take_until(dashboard.received, END)
        alert_items = await take_until(alerts.received, END)

        def topics_of(items: list[tuple[str, Message]], behaviour: str) -> list[str]:
            return [m.topic for name, m in items if name == behaviour]

        assert topics_of(dash_items, "any_speed") == [
            "vehicle.v1.speed",
            "vehicle.v1.eu.speed",
            "speed",
            "vehiclex.v1.speed",
            END,
        ]
        assert topics_of(dash_items, "fleet") == [
            "vehicle.v1.speed",
            "vehicle.v1.eu.speed",
            "vehicle",
            "vehicle.v2.fuel",
            END,
        ]
        assert topics_of(alert_items, "one_vehicle") == ["vehicle.v1.speed", END]
        for _, message in dash_items + alert_items:
            assert message.payload == {"topic": message.topic}
        assert dashboard.received.empty()
        assert alerts.received.empty()


async def test_received_message_carries_verified_sender(settings: Settings) -> None:
    """Subscribers see the broker-verified user, the sender agent and instance, and the id."""
    alerts = Alerts("alerts", settings=settings)
    publisher = Agent("publisher", settings=settings, instance="pub-1")
    async with running(Gateway(settings=settings), alerts, publisher):
        message_id = await publisher.publish("vehicle.v9.speed", {"kmh": 130})
        assert isinstance(message_id, str)
        assert message_id

        [(behaviour, message)] = await take(alerts.received, 1)
        assert behaviour == "one_vehicle"
        assert message.user_id == "guest"
        assert message.app_id == "publisher"
        assert message.instance == "pub-1"
        assert message.message_id == message_id
        assert message.topic == "vehicle.v9.speed"
        assert message.payload == {"kmh": 130}
        assert message.timestamp is not None


async def test_sender_cannot_forge_gateway_headers(settings: Settings) -> None:
    """Headers only the gateway may set (verified user, audit id, redacted fields) are not
    taken from the sender: a subscriber sees what the gateway decided, not forgeries."""
    alerts = Alerts("alerts", settings=settings)
    publisher = Agent("publisher", settings=settings)
    async with running(Gateway(settings=settings), alerts, publisher):
        forged = {"x-mesh-user": "admin", "x-mesh-audit": "forged-1", "x-mesh-redacted": ["ssn"]}
        await publisher.publish("vehicle.v9.speed", {"kmh": 1}, headers=forged)
        [(_, message)] = await take(alerts.received, 1)
        assert message.user_id == "guest"
        assert message.audit_id != "forged-1"
        assert "ssn" not in message.redacted


async def test_sender_cannot_forge_delivery_count(settings: Settings) -> None:
    """A first delivery counts as the first, whatever ``x-delivery-count`` the sender set
    (else a sender could make a subscriber dead-letter its message on the first failure)."""
    alerts = Alerts("alerts", settings=settings)
    publisher = Agent("publisher", settings=settings)
    async with running(Gateway(settings=settings), alerts, publisher):
        await publisher.publish("vehicle.v9.speed", {}, headers={"x-delivery-count": 4})
        [(_, message)] = await take(alerts.received, 1)
        assert message.delivery_count == 0


async def test_publish_returns_distinct_ids_once_confirmed(settings: Settings) -> None:
    """``publish`` returns the message id once the broker confirmed the message: by then it
    sits in the queues bound to ``mesh.policy``; each message gets its own id."""
    publisher = Agent("publisher", settings=settings)
    async with running(publisher), broker(settings) as amqp:
        tap = await amqp.tap("mesh.policy", "a.b")
        ids = [await publisher.publish("a.b", {"n": n}) for n in range(3)]
        assert len(set(ids)) == 3
        assert all(isinstance(i, str) and i for i in ids)
        # No waiting: the confirm means the broker already routed all three.
        assert await amqp.depth(tap.name) == 3
        tapped = [await tap.get(no_ack=True) for _ in ids]
        assert [m.message_id for m in tapped] == ids
        assert {m.user_id for m in tapped} == {"guest"}


class CountAll(SubscriberBehaviour):
    max_concurrency = 4

    @on("load.#")
    async def count(self, msg: Message, payload: object) -> None:
        recorder(self).received.put_nowait((self.name, msg))


class LoadCounter(Recorder):
    behaviours = [CountAll]


async def test_concurrent_publishers_deliver_each_message_exactly_once(
    settings: Settings,
) -> None:
    """20 tasks of 50 publishes each on one agent: every message arrives, none twice."""
    tasks, per_task = 20, 50
    counter = LoadCounter("counter", settings=settings)
    publisher = Agent("publisher", settings=settings)
    async with running(Gateway(settings=settings), counter, publisher):

        async def publish_many(task: int) -> list[str]:
            return [
                await publisher.publish(f"load.t{task}", {"task": task, "n": n})
                for n in range(per_task)
            ]

        batches = await asyncio.gather(*(publish_many(t) for t in range(tasks)))
        sent = [mid for batch in batches for mid in batch]
        assert len(set(sent)) == tasks * per_task

        received = await take(counter.received, tasks * per_task, timeout=30)
        counts = Counter(message.message_id for _, message in received)
        assert set(counts) == set(sent)
        assert max(counts.values()) == 1

        # Nothing left behind: the behaviour's queue is drained and nothing came twice.
        async with broker(settings) as amqp:
            assert await amqp.depth("mesh.q.counter.count_all") == 0
        assert counter.received.empty()


class InOrder(SubscriberBehaviour):
    max_concurrency = 1

    @on("seq.#")
    async def record(self, msg: Message, payload: object) -> None:
        recorder(self).received.put_nowait((self.name, msg))


class Sequencer(Recorder):
    behaviours = [InOrder]


async def test_single_consumer_keeps_publisher_order(settings: Settings) -> None:
    """A max_concurrency=1 behaviour handles one publisher's 500 messages in send order."""
    count = 500
    sequencer = Sequencer("sequencer", settings=settings)
    publisher = Agent("publisher", settings=settings)
    async with running(Gateway(settings=settings), sequencer, publisher):
        for n in range(count):
            await publisher.publish("seq.item", {"n": n})
        received = await take(sequencer.received, count, timeout=30)
        assert [message.payload["n"] for _, message in received] == list(range(count))


INVALID_TOPICS = [
    "", "_req.other.op", "_ctl._all.shutdown", "a.*.c", "a.#", "a..b", "a b", "x" * 256,
]


async def test_invalid_topics_raise_topic_error(settings: Settings) -> None:
    """Publishing to a wildcard, reserved or malformed topic raises ``TopicError`` and sends
    nothing."""
    publisher = Agent("publisher", settings=settings)
    async with running(publisher), broker(settings) as amqp:
        tap = await amqp.tap("mesh.policy", "#")
        for topic in INVALID_TOPICS:
            with pytest.raises(TopicError):
                await publisher.publish(topic, {})
        # Confirmed after the failed calls, the sentinel is the only user message routed.
        await publisher.publish("sentinel", {})
        user_keys = []
        while (incoming := await tap.get(no_ack=True, fail=False)) is not None:
            if not (incoming.routing_key or "").startswith("_registry."):
                user_keys.append(incoming.routing_key)
        assert user_keys == ["sentinel"]


def test_invalid_subscription_pattern_is_refused_at_definition() -> None:
    """``@on`` with a malformed pattern raises ``TopicError`` when the class is defined."""
    with pytest.raises(TopicError, match="invalid pattern"):

        class Bad(SubscriberBehaviour):
            @on("a.b*")
            async def handler(self, msg: Message, payload: object) -> None: ...
