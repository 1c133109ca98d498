"""The mesh's own traffic travels a lane of its own: user subscriptions see user events only."""

from __future__ import annotations

import asyncio
import json

import pytest
from agents_reliability import Host, drain, host, mesh_id, peek, subscriber
from helpers import decision_of, running, take

from behaviours import SubscriberBehaviour
from mesh import Agent, Client, Message, Settings, TopicError, on, on_registry, rpc, topology
from mesh.envelope import to_amqp
from mesh.gateway import Gateway


class Everything(SubscriberBehaviour):
    @on("#")
    async def anything(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg.topic)


class Registry(SubscriberBehaviour):
    @on_registry("join")
    async def joined(self, msg: Message, payload: dict[str, object]) -> None:
        host(self).seen.put_nowait(("join", payload["agent"]))


class Server(Agent):
    @rpc("double")
    async def double(self, msg: Message, payload: dict[str, int]) -> dict[str, int]:
        return {"n": payload["n"] * 2}


async def test_a_catch_all_subscriber_sees_user_events_only(settings: Settings) -> None:
    """With requests, replies, control and registry events flowing, an ``@on("#")``
    behaviour gets user events and nothing else, and every request is answered."""
    watcher = subscriber(settings, Everything, agent_id="watcher")
    server = Server("server", settings=settings)
    client = Client(settings=settings)
    async with running(Gateway(settings=settings), watcher, server, client), peek(
        settings
    ) as broker:
        answers = await asyncio.gather(
            *(client.request("server", "double", {"n": n}) for n in range(20))
        )
        assert answers == [{"n": 2 * n} for n in range(20)]
        assert {r.agent for r in await client.ping(timeout=2)} >= {"watcher", "server"}
        await client.publish("user.event", {})
        assert await take(watcher.seen, 1) == ["user.event"]
        assert drain(watcher.seen) == []
        assert await broker.dead_letters_through_marker() == []


def test_unknown_registry_event_is_refused() -> None:
    with pytest.raises(TopicError, match="unknown registry event 'joined'"):
        on_registry("joined")


async def test_registry_events_reach_on_registry_handlers(settings: Settings) -> None:
    """``@on_registry`` binds the registry's events on the mesh's own lane."""
    observer = subscriber(settings, Registry, agent_id="observer")
    async with running(Gateway(settings=settings), observer):
        newcomer = Host("newcomer", settings=settings)
        async with running(newcomer):
            seen = await take(observer.seen, 2)
    assert ("join", "newcomer") in seen


async def test_user_lane_refuses_the_mesh_keys_and_the_other_way_round(settings: Settings) -> None:
    """A ``_`` key sent to ``mesh.policy``, or a user topic sent to ``mesh.policy.internal``,
    is denied by the gateway (no lane may carry the other's traffic): audited with the
    reason, the sender told, not dead-lettered, and never delivered."""
    sender = Agent("sender", settings=settings)
    watcher = subscriber(settings, Everything, agent_id="watcher")
    async with running(Gateway(settings=settings), sender, watcher), peek(settings) as broker:
        notices = await broker.tap(topology.INTERNAL_EXCHANGE, "_err.sender.*")
        refused = []
        for exchange, key in (
            (topology.POLICY_EXCHANGE, "_registry.join"),
            (topology.INTERNAL_POLICY_EXCHANGE, "user.event"),
        ):
            message = sender._message(key, {})
            await sender.transport.publish(
                exchange, key, to_amqp(message, user_id=sender.transport.user)
            )
            record = await decision_of(settings, message.message_id)
            assert (record.decision, record.stage, record.topic) == ("denied", "decode", key)
            assert record.reason is not None and "travels on" in record.reason
            notice = json.loads((await broker.get(notices)).body)
            assert (notice["message_id"], notice["error"]) == (message.message_id, record.reason)
            refused.append(message.message_id)
        dead = {mesh_id(d) for d in await broker.dead_letters_through_marker()}
        assert dead.isdisjoint(refused)
        # A user event on its own lane arrives; the refused one never did.
        await sender.publish("user.after", {})
        assert await take(watcher.seen, 1) == ["user.after"]
        assert drain(watcher.seen) == []


class WatchOld(SubscriberBehaviour):
    name = "watch"

    @on("reading.old")
    async def reading(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg.topic)


class WatchNew(WatchOld):
    name = "watch"

    @on("reading.new")
    async def reading(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg.topic)


async def test_a_renamed_pattern_no_longer_delivers_after_restart(settings: Settings) -> None:
    """A binding the code dropped is removed from the shared queue at the next start."""
    publisher = Agent("pub", settings=settings)
    async with running(Gateway(settings=settings), publisher), peek(settings) as broker:
        before = subscriber(settings, WatchOld, agent_id="watcher")
        async with running(before):
            await publisher.publish("reading.old", {})
            assert await take(before.seen, 1) == ["reading.old"]
        after = subscriber(settings, WatchNew, agent_id="watcher")
        async with running(after):
            await publisher.publish("reading.old", {})
            await publisher.publish("reading.new", {})
            # One queue, in publish order: a reading.old still bound would come first.
            assert await take(after.seen, 1) == ["reading.new"]
            assert drain(after.seen) == []
            # Still bound, reading.old would have reached the queue and found no handler.
            assert await broker.dead_letters_through_marker() == []


class Mixed(SubscriberBehaviour):
    """A catch-all user pattern declared before a registry handler in one behaviour."""

    @on("#")
    async def anything(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(("user", msg.topic))

    @on_registry("join")
    async def joined(self, msg: Message, payload: dict[str, object]) -> None:
        host(self).seen.put_nowait(("registry", payload["agent"]))


async def test_lanes_do_not_cross_inside_one_behaviour(settings: Settings) -> None:
    """``#`` matches ``_registry.join`` as a string; the dispatch still keeps it for the
    ``@on_registry`` handler, whatever the order of the handlers."""
    mixed = subscriber(settings, Mixed, agent_id="mixed")
    async with running(Gateway(settings=settings), mixed):
        async with running(Host("newcomer", settings=settings)):
            seen = await take(mixed.seen, 1)
            while seen[-1] != ("registry", "newcomer"):
                seen += await take(mixed.seen, 1)
        await mixed.publish("user.event", {})
        seen += await take(mixed.seen, 1)
    assert [kind for kind, _ in seen if kind == "user"] == ["user"]
    assert ("user", "user.event") in seen
