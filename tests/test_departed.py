"""Agents that left: requests fail at once, their queues expire or stay bounded, and what a
full queue drops is dead-lettered and counted."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from agents_reliability import Host, host, mesh_id, peek, subscriber, vhost_of
from helpers import eventually, mesh_cli, running, take

from behaviours import SubscriberBehaviour
from mesh import Client, Message, RemoteError, Settings, on, rpc, topology
from mesh.deadcounts import DROPPED, DeadLetterCounts
from mesh.gateway import Gateway
from mesh.management import ManagementAPI


class Calculator(Host):
    @rpc("add")
    async def add(self, msg: Message, payload: dict[str, int]) -> int:
        return payload["a"] + payload["b"]


class Tally(SubscriberBehaviour):
    """The behaviour of an agent that will leave for good: its queue keeps five."""

    max_queue_length = 5

    @on("count.#")
    async def count(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


class Live(SubscriberBehaviour):
    @on("count.#")
    async def count(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


async def test_request_to_a_departed_agent_fails_at_once(settings: Settings) -> None:
    """Once its last instance left, a request fails with ``NoLiveInstance`` instead of
    waiting out its timeout in a queue nobody reads."""
    caller = Client(settings=settings)
    async with running(Gateway(settings=settings), caller):
        async with running(Calculator("calc", settings=settings)):
            assert await caller.request("calc", "add", {"a": 1, "b": 2}, timeout=10) == 3
        # The cached "alive" answer lasts a second; a fresh caller asks the registry.
        fresh = Client(settings=settings)
        async with running(fresh):
            with pytest.raises(RemoteError) as caught:
                await fresh.request("calc", "add", {"a": 1, "b": 2}, timeout=30)
    assert caught.value.error_type == "NoLiveInstance"
    assert "'calc'" in caught.value.detail


async def test_request_queue_nobody_consumes_expires(settings: Settings) -> None:
    """An agent's ``@rpc`` queue is deleted by the broker once unused for
    ``request_queue_expires`` seconds."""
    settings = settings.model_copy(update={"request_queue_expires": 1.0})
    queue = topology.behaviour_queue("calc", "rpc")
    api = ManagementAPI.for_settings(settings)

    async def exists() -> bool:
        return queue in {q.name for q in await api.queues(vhost_of(settings))}

    async def gone() -> bool:
        return not await exists()

    async with running(Calculator("calc", settings=settings)):
        await eventually(exists)
    await eventually(gone, timeout=30)


async def test_full_queue_of_a_departed_agent_drops_its_oldest_and_stalls_no_one(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A departed agent's queue keeps its newest ``max_queue_length`` messages; the others
    are dead-lettered with reason ``maxlen`` and counted, while a live subscriber of the
    same topic gets every message (the gateway's publishes are not refused)."""
    departed = subscriber(settings, Tally, agent_id="zz")
    live = subscriber(settings, Live, agent_id="live")
    publisher = Client(settings=settings)
    queue = topology.behaviour_queue("zz", "tally")
    async with running(Gateway(settings=settings), live, publisher), peek(settings) as broker:
        async with running(departed):
            pass  # declares its queue, then leaves for good
        ids = [await publisher.publish("count.up", {"n": n}) for n in range(20)]

        received = await take(live.seen, 20)
        assert [m.payload["n"] for m in received] == list(range(20))

        async def holds_five() -> bool:
            return await broker.depth(queue) == 5

        await eventually(holds_five)

        dead = [await broker.dead_letter() for _ in range(15)]
        assert sorted(mesh_id(d) for d in dead) == sorted(ids[:15])
        for letter in dead:
            assert (letter.headers or {})["x-mesh-queue"] == queue
            assert f"({DROPPED})" in str((letter.headers or {})["x-mesh-reason"])

        counts = DeadLetterCounts(redis, settings.namespace)

        async def fifteen_dropped() -> bool:
            entry = (await counts.by_queue()).get(queue)
            assert entry is not None and entry.dropped == 15, entry
            return True

        await eventually(fifteen_dropped)


async def test_queues_lists_depth_drops_and_owners_and_forget_removes_the_departed(
    settings: Settings,
) -> None:
    """``mesh queues`` shows a departed agent's full queue as gone with what it dropped;
    ``mesh forget`` refuses a live agent, asks before deleting, and deletes."""
    departed = subscriber(settings, Tally, agent_id="zz")
    live = subscriber(settings, Live, agent_id="live")
    publisher = Client(settings=settings)
    queue = topology.behaviour_queue("zz", "tally")
    async with running(Gateway(settings=settings), live, publisher):
        async with running(departed):
            pass
        for n in range(20):
            await publisher.publish("count.up", {"n": n})
        await take(live.seen, 20)

        async def listed() -> dict[str, dict[str, object]]:
            code, out, err = await mesh_cli(settings, "queues", "--json")
            assert code == 0, err
            rows = {row["name"]: row for row in json.loads(out)}
            assert rows[queue]["dropped"] == 15 and rows[queue]["messages"] == 5, rows[queue]
            return rows

        rows = await eventually(listed, timeout=30)  # the broker samples depths every 5 s
        assert (rows[queue]["owner"], rows[queue]["state"]) == ("zz", "gone")
        mine = topology.behaviour_queue("live", "live")
        assert (rows[mine]["owner"], rows[mine]["state"]) == ("live", "live")
        assert rows[topology.GATEWAY_QUEUE]["owner"] == "(mesh)"

        code, _, err = await mesh_cli(settings, "forget", "live", "--yes")
        assert code == 1 and "agent 'live' is alive" in err

        code, out, err = await mesh_cli(settings, "forget", "zz", stdin="n\n")
        assert code == 1 and "losing 5 message(s)?" in out and "nothing deleted" in err
        code, out, _ = await mesh_cli(settings, "forget", "zz", stdin="y\n")
        assert code == 0 and "deleted 1 queue(s) of 'zz'" in out

        api = ManagementAPI.for_settings(settings)
        assert queue not in {q.name for q in await api.queues(vhost_of(settings))}
        exchanges = set(await api.exchanges(vhost_of(settings)))
        assert topology.requeue_exchange("zz") not in exchanges  # its retry path went too
        assert topology.requeue_exchange("live") in exchanges


async def test_queues_and_forget_name_a_vhost_that_does_not_exist(settings: Settings) -> None:
    """Not the management API's bare ``HTTP 404 Not Found`` for the vhost's queues."""
    url = urlsplit(settings.amqp_url)
    elsewhere = settings.model_copy(
        update={"amqp_url": url._replace(path="/no-such-vhost").geturl()}
    )
    for command in (["queues"], ["forget", "zz", "--yes"]):
        code, out, err = await mesh_cli(elsewhere, *command)
        assert code == 1, (command, out, err)
        [line] = err.splitlines()
        assert "vhost 'no-such-vhost' does not exist" in line, (command, err)


class Disposable(SubscriberBehaviour):
    queue_type = "classic"

    @on("scratch.#")
    async def scratch(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


async def test_a_behaviour_may_choose_a_classic_queue(settings: Settings) -> None:
    """``queue_type = "classic"`` declares a classic queue (cheaper, not replicated) with the
    same length limit; the default stays quorum; anything else is refused at class creation."""
    agent = subscriber(settings, Disposable, Live, agent_id="mixed")
    api = ManagementAPI.for_settings(settings)
    async with running(agent):

        async def types() -> dict[str, str]:
            listed = {q.name: q.type for q in await api.queues(vhost_of(settings))}
            assert topology.behaviour_queue("mixed", "disposable") in listed, listed
            return listed

        listed = await eventually(types)
    assert listed[topology.behaviour_queue("mixed", "disposable")] == "classic"
    assert listed[topology.behaviour_queue("mixed", "live")] == "quorum"
    with pytest.raises(ValueError, match="queue_type 'stream'"):
        type("Wrong", (SubscriberBehaviour,), {"queue_type": "stream"})
