"""The gateway: authentication by user_id, x-mesh-user, audit records, ack after relay, replicas."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter

import pytest
from agents_reliability import Host, Service, counts_are, drain, mesh_id, peek, user_of
from helpers import decision_of, eventually, running, take

from mesh import RemoteError, Settings, topology
from mesh.devservices import BrokerAdmin
from mesh.envelope import H_REASON, H_USER
from mesh.gateway import Gateway, Passage, default_stages

AUDIT_LOGGER = "mesh.gateway.audit"




class Count:
    """A pipeline stage that counts the messages one gateway replica passes."""

    name = "count"

    def __init__(self) -> None:
        self.passed = 0

    async def __call__(self, passage: Passage) -> None:
        self.passed += 1


def anonymous(agent: Host) -> Host:
    """Make ``agent`` publish without an AMQP user_id, as a client that skips it would."""
    agent.transport.user = None  # type: ignore[assignment]
    return agent


async def test_event_without_user_id_is_denied(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """No user_id: not delivered, recorded as denied with the reason (not dead-lettered),
    and the sender is told."""
    service = Service("svc", settings=settings)
    sender = Host("anon", settings=settings)
    async with running(Gateway(settings=settings), service, sender), peek(settings) as broker:
        anonymous(sender)
        notices = await broker.tap(topology.INTERNAL_EXCHANGE, "_err.#")
        message_id = await sender.publish("news.flash", {"text": "unverified"})
        record = await decision_of(settings, message_id)
        notice = await broker.get(notices)
        await eventually(lambda: "error notice" in caplog.text)
        dead = await broker.dead_letters_through_marker()
        # A verified message published afterwards arrives, the denied one never does.
        await service.publish("news.after", {})
        received = await take(service.seen, 1)
    assert [m.topic for m in received] == ["news.after"]
    assert (record.decision, record.stage) == ("denied", "authenticate")
    assert record.reason is not None and "user_id" in record.reason
    assert (record.user, record.agent, record.topic) == (None, "anon", "news.flash")
    assert message_id not in [mesh_id(d) for d in dead]
    assert notice.routing_key == topology.error_key("anon", sender.instance)
    assert notice.type == "error"
    assert "user_id" in str(notice.headers[H_REASON])
    body = json.loads(notice.body)
    assert (body["message_id"], body["stage"], body["error"]) == (
        message_id, "authenticate", record.reason
    )


async def test_request_without_user_id_fails_fast_with_remote_error(settings: Settings) -> None:
    """A request the gateway denies answers the caller with RemoteError, not a timeout; the
    denial is recorded, not dead-lettered, and the handler never runs."""
    service = Service("svc", settings=settings)
    caller = Host("caller", settings=settings)
    async with running(Gateway(settings=settings), service, caller), peek(settings) as broker:
        anonymous(caller)
        replies = await broker.tap(topology.INTERNAL_EXCHANGE, caller.reply_to)
        with pytest.raises(RemoteError) as failure:
            await caller.request("svc", "echo", {"x": 1}, timeout=20)
        notice = json.loads((await broker.get(replies)).body)
        record = await decision_of(settings, notice["message_id"])
        dead = await broker.dead_letters_through_marker()
    assert failure.value.error_type == "Denied"
    assert "user_id" in failure.value.detail
    assert (record.decision, record.stage, record.reason) == (
        "denied", "authenticate", failure.value.detail
    )
    assert record.topic == topology.request_key("svc", "echo")
    assert record.type == "request"
    assert notice["message_id"] not in [mesh_id(d) for d in dead]
    assert service.seen.empty()


async def test_relayed_message_carries_the_verified_user(settings: Settings) -> None:
    """The gateway adds x-mesh-user (the broker-verified user); subscribers see it as user_id."""
    service = Service("svc", settings=settings)
    sender = Host("pub", settings=settings)
    async with running(Gateway(settings=settings), service, sender), peek(settings) as broker:
        copy = await broker.tap(topology.TOPIC_EXCHANGE, "news.#")
        message_id = await sender.publish("news.flash", {"text": "hi"})
        [received] = await take(service.seen, 1)
        raw = await broker.get(copy)
    assert raw.headers["x-mesh-id"] == message_id  # the copy's own message_id is not
    assert raw.headers[H_USER] == user_of(settings)
    assert received.message_id == message_id
    assert received.user_id == user_of(settings)
    assert received.app_id == "pub"


async def test_audit_log_records_user_agent_and_routing_key(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Each relayed message gets an audit record naming its user, agent and routing key, in
    the audit trail and in the log line's ``audit`` dict alike."""
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    service = Service("svc", settings=settings)
    sender = Host("pub", settings=settings)
    async with running(Gateway(settings=settings), service, sender):
        sent = {
            await sender.publish("news.one", {}): "news.one",
            await sender.publish("news.two.three", {}): "news.two.three",
        }
        await take(service.seen, 2)
        assert await sender.request("svc", "echo", {"x": 1}) == {"x": 1}
        trail = {message_id: await decision_of(settings, message_id) for message_id in sent}
    logged = {
        r.audit["message_id"]: r for r in caplog.records
        if r.name == AUDIT_LOGGER and hasattr(r, "audit")
    }
    audits = {message_id: r.audit for message_id, r in logged.items()}
    for message_id, topic in sent.items():
        record = trail[message_id]
        assert record.decision == "allowed"
        assert (record.stage, record.reason) == (None, None)
        assert record.user == user_of(settings)
        assert record.agent == "pub"
        assert record.instance == sender.instance
        assert record.topic == topic
        assert record.type == "event"
        assert record.payload_sha256 is not None and len(record.payload_sha256) == 64
        # The log line carries the very record the trail keeps.
        assert audits[message_id] == record.model_dump(mode="json", exclude_none=True)
        assert logged[message_id].getMessage() == (
            f"allowed {message_id} from {user_of(settings)}/pub (-) on {topic}"
        )
    by_key = {a["topic"]: a for a in audits.values()}
    assert by_key[topology.request_key("svc", "echo")]["agent"] == "pub"
    assert by_key[topology.request_key("svc", "echo")]["type"] == "request"
    assert by_key[sender.reply_to]["agent"] == "svc"
    assert by_key[sender.reply_to]["type"] == "reply"
    assert all(a["decision"] == "allowed" for a in by_key.values())


async def test_burst_is_relayed_completely_and_the_policy_queue_drains(
    settings: Settings, admin: BrokerAdmin
) -> None:
    """500 messages queued before any gateway runs all arrive; mesh.gateway ends empty."""
    service = Service("svc", settings=settings)
    sender = Host("pub", settings=settings)
    async with running(service, sender), peek(settings) as broker:
        sent = await asyncio.gather(
            *(sender.publish("news.burst", {"n": n}) for n in range(500))
        )
        assert await broker.depth(topology.GATEWAY_QUEUE) >= 500
        async with running(Gateway(settings=settings)):
            received = await take(service.seen, 500)
            await eventually(
                lambda: counts_are(admin, settings, topology.GATEWAY_QUEUE, ready=0, unacked=0)
            )
    assert sorted(m.message_id for m in received) == sorted(sent)


async def test_two_gateway_replicas_share_the_load_without_loss_or_duplicates(
    settings: Settings,
) -> None:
    """Both replicas relay some messages; every message arrives exactly once."""
    counters = [Count(), Count()]
    gateways = [
        Gateway(settings=settings, instance=f"g{i}", stages=[*default_stages(), counter])
        for i, counter in enumerate(counters)
    ]
    service = Service("svc", settings=settings)
    sender = Host("pub", settings=settings)
    async with running(*gateways, service, sender):
        sent = await asyncio.gather(
            *(sender.publish("news.load", {"n": n}) for n in range(400))
        )
        received = await take(service.seen, 400)
        await service.stop()
    assert Counter(m.message_id for m in received) == Counter(sent)
    assert len(set(sent)) == 400
    assert all(counter.passed > 0 for counter in counters)
    assert drain(service.seen) == []
