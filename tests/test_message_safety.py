"""Message safety: teardown runs to its end, the gateway's lifecycle is not the mesh's to
change, replies are accepted only from whom was asked, and ``mesh.dead`` is a bounded stream
that expired requests stay out of."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aio_pika
import pytest
from agents_core import Recorder, Slow, recorder
from agents_reliability import (
    Service,
    consumers,
    mesh_id,
    peek,
    vhost_of,
)
from aio_pika.abc import AbstractIncomingMessage
from helpers import decision_of, eventually, running, take
from pydantic import BaseModel

from behaviours import OneShotBehaviour, SubscriberBehaviour
from mesh import (
    Agent,
    Behaviour,
    BehaviourStatus,
    Client,
    Message,
    MessageType,
    RemoteError,
    RequestTimeout,
    Settings,
    TopicError,
    deadletter,
    on,
    rpc,
    topology,
)
from mesh.devservices import BrokerAdmin
from mesh.gateway import Gateway

# --- teardown runs to its end once begun -----------------------------------------------------


class BlockedTeardown(OneShotBehaviour):
    """Consumes ``teardown.item``; ``run`` ends when the test says so, and ``teardown``
    waits for the test too."""

    @on("teardown.item")
    async def item(self, msg: Message, payload: object) -> None:
        recorder(self).received.put_nowait((self.name, msg))

    async def run(self) -> int:
        await recorder(self).events["end_main"].wait()
        return 4

    async def teardown(self) -> None:
        lab = recorder(self)
        lab.events["teardown_begun"].set()
        try:
            await lab.events["release_teardown"].wait()
        except asyncio.CancelledError:
            lab.counts["teardown_cancelled"] += 1
            raise
        lab.counts["teardown_completed"] += 1


class HandlerInFlight(OneShotBehaviour):
    """Its handler holds ``inflight.item`` until released; ``run`` ends when told."""

    @on("inflight.item")
    async def item(self, msg: Message, payload: object) -> None:
        lab = recorder(self)
        lab.events["handling"].set()
        await lab.events["release_handler"].wait()
        lab.counts["handled"] += 1
        lab.received.put_nowait((self.name, msg))

    async def run(self) -> int:
        await recorder(self).events["end_main"].wait()
        return 0


class TeardownLab(Recorder):
    behaviours = [BlockedTeardown]


class InFlightLab(Recorder):
    behaviours = [HandlerInFlight]


async def consumers_are(admin: BrokerAdmin, settings: Settings, queue: str, count: int) -> bool:
    return await consumers(admin, settings, queue) == count


def interrupt(behaviour: Behaviour, how: str) -> asyncio.Task[Any]:
    """``stop()`` as a task, or ``kill()`` and a task waiting for the end; either ends
    with the behaviour's exit code."""
    if how == "stop":
        return asyncio.create_task(behaviour.stop(7))
    behaviour.kill(7)
    return asyncio.create_task(behaviour.wait())


def workers_of(agent: Agent, behaviour: str) -> list[asyncio.Task[Any]]:
    """The handler worker tasks of ``behaviour`` still alive (named by _Consumer)."""
    prefix = f"{agent.id}.{behaviour}.worker"
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(prefix) and not t.done()]


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_stop_or_kill_during_teardown_waits_for_teardown_to_finish(
    settings: Settings, admin: BrokerAdmin, how: str
) -> None:
    """``stop()``/``kill()`` once teardown has begun neither interrupt it nor return early;
    afterwards the consumer's channel is closed and a restart has exactly one consumer."""
    agent = TeardownLab("lab", settings=settings)
    async with running(Gateway(settings=settings), agent):
        behaviour = agent.behaviour("blocked_teardown")
        queue = behaviour.queue_name
        assert behaviour._consumer is not None and behaviour._consumer.channel is not None
        channel = behaviour._consumer.channel

        agent.events["end_main"].set()
        await asyncio.wait_for(agent.events["teardown_begun"].wait(), 5)
        ending = interrupt(behaviour, how)
        # The consumer was cancelled before teardown() began; seeing that at the broker
        # takes far longer than an interrupted teardown would need to end.
        await eventually(lambda: consumers_are(admin, settings, queue, 0))
        assert not ending.done(), f"{how}() returned while teardown() was still blocked"
        assert behaviour.status is BehaviourStatus.RUNNING
        assert agent.counts["teardown_cancelled"] == 0

        agent.events["release_teardown"].set()
        # main returned 4 by itself: the late stop()/kill() does not change that.
        assert await asyncio.wait_for(ending, 5) == 4
        assert agent.counts["teardown_completed"] == 1
        assert agent.counts["teardown_cancelled"] == 0
        assert behaviour.status is BehaviourStatus.DONE
        assert channel.is_closed

        agent.events["end_main"].clear()
        await agent.start_behaviour("blocked_teardown")
        assert behaviour.status is BehaviourStatus.RUNNING
        await eventually(lambda: consumers_are(admin, settings, queue, 1))
        await agent.publish("teardown.item", {"n": 1})
        [(_, received)] = await take(agent.received, 1)
        assert received.payload == {"n": 1}
        assert await consumers(admin, settings, queue) == 1


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_stop_or_kill_during_teardown_waits_for_the_handler_in_flight(
    settings: Settings, admin: BrokerAdmin, how: str
) -> None:
    """Teardown waiting for a running handler is not cut short by ``stop()``/``kill()``:
    the status stays running until the handler finished and its channel closed; no worker
    or channel outlives it, and a restart has exactly one consumer."""
    agent = InFlightLab("lab", settings=settings)
    async with running(Gateway(settings=settings), agent), peek(settings) as broker:
        behaviour = agent.behaviour("handler_in_flight")
        queue = behaviour.queue_name
        assert behaviour._consumer is not None and behaviour._consumer.channel is not None
        channel = behaviour._consumer.channel
        await agent.publish("inflight.item", {"n": 1})
        await asyncio.wait_for(agent.events["handling"].wait(), 5)

        agent.events["end_main"].set()
        # Teardown's first step cancels the consumer: once the broker lists none, it has
        # begun, and waits for the handler.
        await eventually(lambda: consumers_are(admin, settings, queue, 0))
        ending = interrupt(behaviour, how)
        # Asking the broker again takes far longer than an interrupted teardown would need.
        assert await consumers(admin, settings, queue) == 0
        assert not ending.done(), f"{how}() returned while a handler was still running"
        assert behaviour.status is BehaviourStatus.RUNNING
        assert workers_of(agent, behaviour.name)
        assert not channel.is_closed  # the handler still needs it to ack

        agent.events["release_handler"].set()
        assert await asyncio.wait_for(ending, 5) == 0
        assert agent.counts["handled"] == 1
        assert behaviour.status is BehaviourStatus.DONE
        assert channel.is_closed
        assert workers_of(agent, behaviour.name) == []
        # Acked before the channel closed: a closed channel would have requeued it.
        assert await broker.depth(queue) == 0

        agent.events["end_main"].clear()
        await agent.start_behaviour("handler_in_flight")
        await eventually(lambda: consumers_are(admin, settings, queue, 1))
        assert len(workers_of(agent, behaviour.name)) == behaviour.max_concurrency
        await agent.publish("inflight.item", {"n": 2})
        [(_, first), (_, second)] = await take(agent.received, 2)
        assert [first.payload, second.payload] == [{"n": 1}, {"n": 2}]
        assert await consumers(admin, settings, queue) == 1


# --- the gateway takes no control commands over the mesh but ping ----------------------------




async def assert_relay_runs(gateway: Gateway, client: Client, service: Service) -> None:
    """The relay is running and a message published now still arrives."""
    assert not gateway.should_stop
    assert gateway.behaviour("relay").status is BehaviourStatus.RUNNING
    message_id = await client.publish("news.after", {})
    [received] = await take(service.seen, 1, timeout=10)
    assert received.message_id == message_id


async def assert_gateway_answers_ping(client: Client) -> None:
    everyone = await client.ping(timeout=5)
    assert [(r.agent, r.instance) for r in everyone] == [("gateway", "g1"), ("svc", "s1")]
    only = await client.ping("gateway", timeout=5)
    assert [(r.agent, r.instance) for r in only] == [("gateway", "g1")]


async def test_stop_behaviour_sent_to_all_does_not_reach_the_gateway(settings: Settings) -> None:
    """``_ctl._all.stop_behaviour {"behaviour": "relay"}`` reaches the agents, not the
    gateway: its relay keeps running and messages still flow."""
    gateway = Gateway(settings=settings, instance="g1")
    service = Service("svc", settings=settings, instance="s1")
    client = Client(settings=settings)
    async with running(gateway, service, client):
        replies = await client.control(
            topology.ALL_AGENTS, "stop_behaviour", {"behaviour": "relay"}, timeout=5
        )
        # Only svc answers (it has no relay); no answer, and no stop, from the gateway.
        assert [(r.app_id, r.type, r.payload["type"]) for r in replies] == [
            ("svc", MessageType.ERROR, "KeyError")
        ]
        await assert_relay_runs(gateway, client, service)
        await assert_gateway_answers_ping(client)


@pytest.mark.parametrize(
    ("command", "args"),
    [("stop_behaviour", {"behaviour": "relay"}), ("shutdown", None)],
)
async def test_gateway_denies_control_commands_other_than_ping(
    settings: Settings, command: str, args: dict[str, str] | None
) -> None:
    """A control command sent to the gateway is denied by its guard stage with a reason;
    the relay keeps running and the gateway still answers ping."""
    gateway = Gateway(settings=settings, instance="g1")
    service = Service("svc", settings=settings, instance="s1")
    client = Client(settings=settings)
    async with running(gateway, service, client), peek(settings) as broker:
        replies = await client.control("gateway", command, args, timeout=5)
        assert [(r.type, r.payload.get("type")) for r in replies] == [(MessageType.ERROR, "Denied")]
        [denied] = replies
        assert denied.payload["stage"] == "guard"
        assert "ping" in denied.payload["error"]
        # Audited as denied by the guard, with the reason the client was told; not
        # dead-lettered.
        command_id = denied.payload["message_id"]
        record = await decision_of(settings, command_id)
        assert (record.decision, record.stage, record.reason) == (
            "denied", "guard", denied.payload["error"]
        )
        assert record.topic == topology.control_key("gateway", command)
        assert command_id not in [mesh_id(d) for d in await broker.dead_letters_through_marker()]
        await assert_relay_runs(gateway, client, service)
        await assert_gateway_answers_ping(client)


# --- receivers do not trust claims -----------------------------------------------------------


@pytest.mark.parametrize(
    "pattern", ["_req.#", "_reply.#", "_ctl.#", "_req.slow.work", "_registry.join"]
)
def test_on_rejects_the_mesh_reserved_keys(pattern: str) -> None:
    """``@on`` cannot bind requests, replies or control: ``TopicError`` at class definition."""
    with pytest.raises(TopicError, match="belong to the mesh"):

        class Eavesdrop(SubscriberBehaviour):
            @on(pattern)
            async def spy(self, msg: Message, payload: object) -> None:
                """Would see other agents' traffic."""


async def test_forged_reply_from_a_third_agent_is_not_accepted(settings: Settings) -> None:
    """A reply with the right correlation id from an agent that was not asked is ignored:
    the caller gets the real reply afterwards.  The gateway's own notices still count: a
    request nobody serves fails with ``Unroutable`` at once."""
    slow = Slow("slow", settings=settings)
    caller = Agent("caller", settings=settings)
    forger = Client("mallory", settings=settings)
    async with running(Gateway(settings=settings), slow, caller, forger):
        asking = asyncio.create_task(caller.request("slow", "work", {}, timeout=20))
        [(_, request)] = await take(slow.received, 1)
        forged = forger._message(
            caller.reply_to,
            {"from": "mallory"},
            type=MessageType.REPLY,
            correlation_id=request.correlation_id,
        )
        await forger.send(forged, caller.reply_to)
        # The ping follows the forged reply from the same sender through the relay into
        # the caller's inbox, so once the caller answered it the forgery was handled.
        assert [r.agent for r in await forger.ping("caller", timeout=5)] == ["caller"]
        assert not asking.done(), f"caller accepted the forged reply: {asking.result()!r}"

        slow.events["release"].set()
        assert await asyncio.wait_for(asking, 5) == {"from": "slow"}

        with pytest.raises(RemoteError) as caught:
            await caller.request("slow", "anything", {}, timeout=20)
        assert caught.value.error_type == "Unroutable"


async def test_second_answer_from_one_instance_is_not_counted(settings: Settings) -> None:
    """A control round takes one answer per instance: a repeated answer under the same
    agent and instance (here replayed by another client) is not counted again."""
    svc = Recorder("svc", settings=settings, instance="s1")
    caller = Agent("caller", settings=settings)
    forger = Client("mallory", settings=settings)
    async with running(Gateway(settings=settings), svc, caller, forger), peek(settings) as broker:
        commands = await broker.tap(topology.INTERNAL_EXCHANGE, topology.control_key("svc", "ping"))
        # expect=2: the round would end early if a second answer were counted.
        collecting = asyncio.create_task(caller.control("svc", "ping", timeout=3, expect=2))
        command = await broker.get(commands)
        for _ in range(2):
            replay = Message(
                topic=caller.reply_to,
                payload=svc.describe().model_dump(mode="json"),
                type=MessageType.REPLY,
                app_id="svc",
                instance="s1",
                correlation_id=command.correlation_id,
            )
            await forger.send(replay, caller.reply_to)
        replies = await collecting
        assert [(r.app_id, r.instance) for r in replies] == [("svc", "s1")]


# --- mesh.dead is a bounded stream; expired requests are dropped -----------------------------


class Calculator(Agent):
    @rpc("add")
    async def add(self, msg: Message, payload: dict[str, int]) -> int:
        return payload["a"] + payload["b"]


async def queue_rows(admin: BrokerAdmin, settings: Settings) -> dict[str, dict[str, Any]]:
    """Each queue of the test's vhost by name: its type and arguments as the broker has them."""
    out = await admin.ctl(
        "-q", "list_queues", "-p", vhost_of(settings), "name", "type", "arguments",
        "--formatter", "json",
    )
    return {
        row["name"]: {"type": row["type"], "arguments": {k: v for k, _, v in row["arguments"]}}
        for row in json.loads(out)
    }


async def test_expired_request_is_dropped_not_dead_lettered(
    settings: Settings, admin: BrokerAdmin
) -> None:
    """A request that expires in a queue nobody consumes times out for the caller and is
    dropped by the broker: it never reaches ``mesh.dead``.  Neither the request queue nor
    the caller's inbox has a dead-letter exchange."""
    calc = Calculator("calc", settings=settings)
    caller = Agent("caller", settings=settings)
    queue = topology.behaviour_queue("calc", "rpc")
    async with running(Gateway(settings=settings), calc, caller), peek(settings) as broker:
        await calc.stop_behaviour("rpc")
        # Consumed at once, so the tap's copy cannot expire like the request queue's.
        relayed: asyncio.Queue[str] = asyncio.Queue()
        tap = await broker.tap(topology.INTERNAL_EXCHANGE, topology.request_key("calc", "#"))

        async def copy(incoming: AbstractIncomingMessage) -> None:
            relayed.put_nowait(incoming.routing_key or "")

        await tap.consume(copy, no_ack=True)
        with pytest.raises(RequestTimeout):
            await caller.request("calc", "add", {"a": 1, "b": 2}, timeout=0.3)
        # The gateway relayed it, so it went to the (bound, unconsumed) request queue too.
        assert await take(relayed, 1) == [topology.request_key("calc", "add")]
        await eventually(lambda: broker.is_empty(queue))

        dead = await broker.dead_letters_through_marker()
        assert [(d.routing_key, mesh_id(d)) for d in dead] == []

        rows = await queue_rows(admin, settings)
        inbox = topology.inbox_queue(caller.id, caller.instance, 1)  # its first connection's
        assert "x-dead-letter-exchange" not in rows[queue]["arguments"]
        assert "x-dead-letter-exchange" not in rows[inbox]["arguments"]


async def test_dead_letter_queue_is_a_stream_bounded_by_the_settings(
    settings: Settings, admin: BrokerAdmin
) -> None:
    """``mesh.dead`` is declared a stream with ``x-max-length-bytes``/``x-max-age`` from
    ``MESH_DEAD_LETTER_MAX_BYTES``/``MESH_DEAD_LETTER_MAX_AGE``."""
    tuned = Settings.from_env(
        {"MESH_DEAD_LETTER_MAX_BYTES": "5000000", "MESH_DEAD_LETTER_MAX_AGE": "2h"},
        amqp_url=settings.amqp_url,
        redis_url=settings.redis_url,
        namespace=settings.namespace,
    )
    async with running(Agent("first", settings=tuned)):
        dead = (await queue_rows(admin, settings))[topology.DEAD_LETTER_QUEUE]
    assert dead["type"] == "stream"
    assert dead["arguments"]["x-max-length-bytes"] == 5_000_000
    assert dead["arguments"]["x-max-age"] == "2h"


class Item(BaseModel):
    n: int


class Strict(SubscriberBehaviour):
    @on("strict.item", model=Item)
    async def item(self, msg: Message, item: Item) -> None:
        """Never runs in these tests: the payload does not match."""


class StrictAgent(Agent):
    behaviours = [Strict]


async def test_other_retention_settings_keep_the_dead_letter_stream_and_its_letters(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway whose ``MESH_DEAD_LETTER_MAX_*`` differ from those ``mesh.dead`` was declared
    with starts (it failed with ``TopologyError`` before), says so, and files into the stream
    as it is: deleting it to declare it anew would lose its dead letters. Here the stream is
    not even bound to ``mesh.filing`` (its declarer stopped before binding it): the filer binds
    it rather than trying to declare it again and again."""
    async with await aio_pika.connect(settings.amqp_url) as connection:
        await topology.declare_dead_letter_stream(await connection.channel(), 5_000_000, "2h")
    agent = StrictAgent("strict", settings=settings)
    async with running(Gateway(settings=settings), agent):
        message_id = await agent.publish("strict.item", {"n": "not a number"})
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            async with deadletter.DeadLetterStream(channel, "first") as reader:
                dead = await reader.next(15)
    assert mesh_id(dead) == message_id
    kept = [r for r in caplog.records if r.getMessage().startswith("mesh.dead exists with other")]
    assert kept, "no warning about the kept stream"
    assert "x-max-length-bytes" in kept[0].getMessage()
    filer = [r for r in caplog.records if r.name == "mesh.behaviour" and r.levelno >= logging.ERROR]
    assert filer == []


async def test_reading_dead_letters_does_not_consume_them(settings: Settings) -> None:
    """Two ``DeadLetterStream`` readers from offset "first", one after the other, both read
    the same dead letter at the same offset."""
    agent = StrictAgent("strict", settings=settings)
    async with running(Gateway(settings=settings), agent):
        message_id = await agent.publish("strict.item", {"n": "not a number"})
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            reads = []
            for reader_number in (1, 2):
                channel = await connection.channel()
                async with deadletter.DeadLetterStream(channel, "first") as reader:
                    try:
                        reads.append(await reader.next(15))
                    except TimeoutError:
                        raise AssertionError(f"reader {reader_number} got no dead letter") from None
                await channel.close()
    assert [mesh_id(dead) for dead in reads] == [message_id, message_id]
    assert deadletter.stream_offset(reads[0]) == deadletter.stream_offset(reads[1])


async def test_start_during_teardown_starts_again_once_teardown_ended(
    settings: Settings, admin: BrokerAdmin
) -> None:
    """``start()`` while the behaviour is tearing itself down waits for the teardown, then
    starts it again: it does not return early as if it were still running."""
    agent = TeardownLab("lab", settings=settings)
    async with running(Gateway(settings=settings), agent):
        behaviour = agent.behaviour("blocked_teardown")
        agent.events["end_main"].set()
        await asyncio.wait_for(agent.events["teardown_begun"].wait(), 5)
        starting = asyncio.create_task(behaviour.start())
        await eventually(lambda: consumers_are(admin, settings, behaviour.queue_name, 0))
        assert not starting.done(), "start() returned while teardown() was still blocked"

        agent.events["end_main"].clear()
        agent.events["release_teardown"].set()
        await asyncio.wait_for(starting, 5)
        assert behaviour.status is BehaviourStatus.RUNNING
        await eventually(lambda: consumers_are(admin, settings, behaviour.queue_name, 1))
