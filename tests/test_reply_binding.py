"""Replies are bound to requests at the gateway: a reply or error passes only from the agent
the request addressed, only once (a control command: once per answering instance), and only
before the request's deadline, whichever gateway replica the request and the reply pass."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis
from agents_core import Recorder, Slow
from agents_reliability import Peek, Service, mesh_id, peek, user_of
from aio_pika.abc import AbstractQueue
from helpers import PrivateRedis, decision_of, eventually, mesh_cli, running, take

from mesh import (
    Agent,
    Client,
    Message,
    MessageType,
    RemoteError,
    RequestTimeout,
    Settings,
    topology,
)
from mesh.audit import AuditRecord
from mesh.gateway import Gateway
from mesh.gateway.replies import NO_BINDING


def binding_key(settings: Settings, caller: Agent, correlation_id: str | None) -> str:
    return f"{settings.namespace}:replies:{caller.reply_to}:{correlation_id}"


async def denied(settings: Settings, message_id: str | None, reason: str) -> AuditRecord:
    """The audit record of the replies stage's denial of ``message_id``, naming ``reason``."""
    assert message_id is not None
    record = await decision_of(settings, message_id)
    assert (record.decision, record.stage) == ("denied", "replies")
    assert record.reason is not None and reason in record.reason, record.reason
    return record


async def notice_of(broker: Peek, notices: AbstractQueue, message_id: str | None) -> dict[str, Any]:
    """The gateway's error notice about ``message_id`` among those ``notices`` taps."""
    while True:
        notice = await broker.get(notices)
        body = json.loads(notice.body)
        if body.get("message_id") == message_id:
            assert notice.type == "error" and notice.app_id == "gateway"
            return dict(body)


async def none_dead_lettered(broker: Peek, *message_ids: str | None) -> None:
    """A denial is audited, not dead-lettered: none of ``message_ids`` is in ``mesh.dead``."""
    dead = {mesh_id(d) for d in await broker.dead_letters_through_marker()}
    assert dead.isdisjoint(message_ids)


def forged_reply(
    forger: Client, to: Agent, correlation_id: str | None, **claims: str
) -> Message:
    """A reply to ``to`` from ``forger``, claiming to be ``claims`` (app_id, instance)."""
    return Message(
        topic=to.reply_to,
        payload={"from": forger.id},
        type=MessageType.REPLY,
        correlation_id=correlation_id,
        app_id=claims.get("app_id", forger.id),
        instance=claims.get("instance", forger.instance),
    )


async def test_forged_reply_is_denied_at_the_gateway_and_never_reaches_the_caller(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A reply with the right correlation id from an agent that was not asked is denied by
    the gateway: audited with the reason, the sender told, not dead-lettered; the caller's
    inbox gets only the real reply.  The binding names the addressed agent and lives as
    long as the request."""
    slow = Slow("slow", settings=settings)
    caller = Agent("caller", settings=settings)
    forger = Client("mallory", settings=settings)
    async with running(Gateway(settings=settings), slow, caller, forger), peek(
        settings
    ) as broker:
        inbox = await broker.tap(topology.INTERNAL_EXCHANGE, caller.reply_to)
        notices = await broker.tap(
            topology.INTERNAL_EXCHANGE, topology.error_key(forger.id, forger.instance)
        )
        asking = asyncio.create_task(caller.request("slow", "work", {}, timeout=20))
        [(_, request)] = await take(slow.received, 1)
        key = binding_key(settings, caller, request.correlation_id)
        assert await redis.get(key) == b"slow"
        assert 0 < await redis.pttl(key) <= 20_000

        forged = forged_reply(forger, caller, request.correlation_id)
        await forger.send(forged, caller.reply_to)
        why = "reply from 'mallory' to a request addressed to 'slow'"
        record = await denied(settings, forged.message_id, why)
        assert (record.topic, record.agent, record.type) == (caller.reply_to, "mallory", "reply")
        notice = await notice_of(broker, notices, forged.message_id)
        assert (notice["type"], notice["stage"], notice["error"]) == (
            "Denied", "replies", record.reason
        )
        # The forgery did not use the binding up: the real reply still passes.
        assert await redis.get(key) == b"slow"

        slow.events["release"].set()
        assert await asyncio.wait_for(asking, 10) == {"from": "slow"}
        # The forgery was settled before the real reply was even sent: had it been
        # relayed, the caller's route would have carried it first.
        first = await broker.get(inbox)
        assert first.app_id == "slow"
        assert await redis.exists(key) == 0
        await none_dead_lettered(broker, forged.message_id)


async def test_second_reply_is_denied(settings: Settings, redis: aioredis.Redis) -> None:
    """The agent asked answers once: a second reply to the same request is denied."""
    svc = Service("svc", settings=settings)
    caller = Agent("caller", settings=settings)
    async with running(Gateway(settings=settings), svc, caller), peek(settings) as broker:
        inbox = await broker.tap(topology.INTERNAL_EXCHANGE, caller.reply_to)
        notices = await broker.tap(
            topology.INTERNAL_EXCHANGE, topology.error_key(svc.id, svc.instance)
        )
        assert await caller.request("svc", "echo", {"n": 1}, timeout=10) == {"n": 1}
        [request] = await take(svc.seen, 1)
        assert await redis.exists(binding_key(settings, caller, request.correlation_id)) == 0

        again = svc._message(
            caller.reply_to, {"n": 2}, type=MessageType.REPLY,
            correlation_id=request.correlation_id,
        )
        await svc.send(again, again.topic)
        record = await denied(settings, again.message_id, NO_BINDING)
        assert (record.topic, record.agent) == (caller.reply_to, "svc")
        assert (await notice_of(broker, notices, again.message_id))["stage"] == "replies"
        # An error on the caller's error route is checked the same way.
        error = svc._message(
            topology.error_key(caller.id, caller.instance),
            {"error": "late", "type": "Late"},
            type=MessageType.ERROR,
            correlation_id=request.correlation_id,
        )
        await svc.send(error, error.topic)
        record = await denied(settings, error.message_id, NO_BINDING)
        assert record.type == "error"
        await none_dead_lettered(broker, again.message_id, error.message_id)
        # Only the one reply ever reached the caller's route.
        assert (await broker.get(inbox)).app_id == "svc"
        assert await inbox.get(no_ack=True, fail=False) is None


async def test_reply_after_the_deadline_is_denied(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """The binding expires with the request: a reply that comes later is denied."""
    slow = Slow("slow", settings=settings)
    caller = Agent("caller", settings=settings)
    async with running(Gateway(settings=settings), slow, caller), peek(settings) as broker:
        inbox = await broker.tap(topology.INTERNAL_EXCHANGE, caller.reply_to)
        notices = await broker.tap(
            topology.INTERNAL_EXCHANGE, topology.error_key(slow.id, slow.instance)
        )
        asking = asyncio.create_task(caller.request("slow", "work", {}, timeout=1.5))
        [(_, request)] = await take(slow.received, 1)
        key = binding_key(settings, caller, request.correlation_id)
        assert 0 < await redis.pttl(key) <= 1500
        with pytest.raises(RequestTimeout):
            await asking
        await eventually(lambda: _gone(redis, key))

        slow.events["release"].set()
        # The late reply's sender is told; its notice names the message denied.
        late = json.loads((await broker.get(notices)).body)
        record = await denied(settings, late["message_id"], NO_BINDING)
        assert (record.topic, record.agent, record.type) == (caller.reply_to, "slow", "reply")
        assert record.correlation_id == request.correlation_id
        assert (late["stage"], late["error"]) == ("replies", record.reason)
        await none_dead_lettered(broker, late["message_id"])
        assert await inbox.get(no_ack=True, fail=False) is None


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return await redis.exists(key) == 0


async def test_reply_through_another_replica_than_its_request_is_accepted(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """The binding lives in Redis: a request relayed by one replica and its reply relayed
    by another reach the caller, and the reply takes the binding."""
    g1 = Gateway(settings=settings, instance="g1")
    g2 = Gateway(settings=settings, instance="g2")
    slow = Slow("slow", settings=settings)
    caller = Agent("caller", settings=settings)
    async with running(g1, g2, slow, caller):
        await g2.stop_behaviour("relay_internal")
        asking = asyncio.create_task(caller.request("slow", "work", {}, timeout=20))
        [(_, request)] = await take(slow.received, 1)
        key = binding_key(settings, caller, request.correlation_id)
        assert await redis.get(key) == b"slow"  # written by g1, the only relay running

        await g2.start_behaviour("relay_internal")
        await g1.stop_behaviour("relay_internal")
        slow.events["release"].set()
        assert await asyncio.wait_for(asking, 10) == {"from": "slow"}
        assert await redis.exists(key) == 0  # taken by g2


async def test_control_to_all_collects_one_answer_per_instance(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A control command to ``_all`` takes one answer from each instance of any agent; a
    second answer from one instance is denied, and so is an answer to a command addressed
    to another agent."""
    alphas = [Recorder("alpha", settings=settings, instance=f"a{i}") for i in (1, 2)]
    beta = Recorder("beta", settings=settings, instance="b1")
    client = Client(settings=settings)
    forger = Client("mallory", settings=settings)
    async with running(Gateway(settings=settings), *alphas, beta, client, forger), peek(
        settings
    ) as broker:
        answers = await client.control(topology.ALL_AGENTS, "ping", timeout=10)
        assert sorted((a.app_id, a.instance) for a in answers) == [
            ("alpha", "a1"), ("alpha", "a2"), ("beta", "b1"),
        ]
        correlation_id = answers[0].correlation_id
        answered = f"{settings.namespace}:replies:answered:{client.reply_to}:{correlation_id}"
        assert await redis.smembers(answered) == {b"alpha/a1", b"alpha/a2", b"beta/b1"}
        assert await redis.get(binding_key(settings, client, correlation_id)) == b"ctl:_all"

        again = forged_reply(forger, client, correlation_id, app_id="alpha", instance="a1")
        await forger.send(again, client.reply_to)
        record = await denied(
            settings, again.message_id, "alpha/a1 answered this control command already"
        )
        # The record has the claims and the broker user that really sent it.
        assert (record.agent, record.instance) == ("alpha", "a1")
        assert record.user == user_of(settings)

        # A command to alpha takes answers from both its instances, and none from beta.
        answers = await client.control("alpha", "ping", timeout=10)
        assert sorted(a.instance for a in answers) == ["a1", "a2"]
        stray = forged_reply(
            forger, client, answers[0].correlation_id, app_id="beta", instance="b1"
        )
        await forger.send(stray, client.reply_to)
        why = "reply from 'beta' to a request addressed to 'alpha'"
        await denied(settings, stray.message_id, why)
        await none_dead_lettered(broker, again.message_id, stray.message_id)


async def test_request_reply_and_mesh_ping_keep_working(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Ordinary requests, errors and pings pass, each answer through its binding; nothing
    is left bound once a request was answered."""
    svc = Service("svc", settings=settings, instance="s1")
    caller = Client("caller", settings=settings)
    async with running(Gateway(settings=settings, instance="g1"), svc, caller):
        for n in range(5):
            assert await caller.request("svc", "echo", {"n": n}, timeout=10) == {"n": n}
        with pytest.raises(RemoteError) as caught:
            await caller.request("svc", "nothing", {}, timeout=10)
        assert caught.value.error_type == "Unroutable"
        requests = [k async for k in redis.scan_iter(f"{settings.namespace}:replies:_reply.*")]
        # Only the unroutable request's binding is left, until its deadline.
        assert len(requests) == 1

        records = await caller.ping(timeout=10)
        assert [(r.agent, r.instance) for r in records] == [("gateway", "g1"), ("svc", "s1")]
        members: set[bytes] = set()
        async for key in redis.scan_iter(f"{settings.namespace}:replies:answered:*"):
            members |= await redis.smembers(key)
        assert members == {b"gateway/g1", b"svc/s1"}

        code, out, err = await mesh_cli(settings, "ping", "--timeout", "5")
        assert code == 0, err
        assert "svc" in out and "gateway" in out


async def test_redis_unreachable_stops_the_gateway_until_it_answers(
    settings: Settings, private_redis: PrivateRedis
) -> None:
    """Fail closed: a gateway that cannot reach Redis relays nothing (a request waits,
    unacknowledged, its handler not run) and goes on by itself once Redis answers: the
    request is answered, nothing lost."""
    flaky = settings.model_copy(update={"redis_url": private_redis.url})
    svc = Service("svc", settings=settings)
    caller = Agent("caller", settings=settings)
    gateway = Gateway(settings=flaky)
    async with running(gateway, svc, caller):
        await private_redis.kill()
        pending = asyncio.create_task(caller.request("svc", "echo", {"n": 1}, timeout=60))
        await eventually(lambda: not gateway.gate.is_open, what="the gateway closes its gate")
        assert svc.seen.empty()
        assert not pending.done()
        await private_redis.start()
        assert await asyncio.wait_for(pending, 30) == {"n": 1}
        assert gateway.gate.is_open
        assert svc.seen.qsize() == 1
