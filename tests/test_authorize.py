"""The gateway's authorize stage: senders are who their broker user says, and the policy
decides what passes (deny by default, audit mode logs would-deny and passes)."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from agents_reliability import Host, Peek, host, mesh_id, peek, subscriber, vhost_of
from aio_pika.abc import AbstractIncomingMessage
from helpers import decision_of, running, take

from behaviours import SubscriberBehaviour
from mesh import Agent, Client, Message, RemoteError, Settings, on, rpc, topology
from mesh.envelope import H_DEAD_BY, H_DEAD_BY_USER, H_ON_BEHALF_OF, to_amqp
from mesh.gateway import Gateway
from mesh.management import ManagementAPI
from mesh.policy import broker_user
from mesh.provision.credentials import url_as

POLICY = """
principals:
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
  monitor: {kind: agent}
  gateway: {kind: gateway}
  ops: {kind: operator, agents: ["client-*"]}
  bridge: {kind: bridge}
  viewer: {kind: user}
rule_sets:
  telemetry:
    rules:
      - {allow: publish, who: vehicles, topics: "vehicle.{self}.#"}
      - {allow: subscribe, who: monitor, topics: "vehicle.#"}
      - {allow: request, who: monitor, request: {agent: "v[0-9]*", operation: status}}
      - {allow: reply, who: "*", reply: {agent: "*"}}
      - {allow: control, who: ops, control: {agent: "*", command: "*"}}
      - {allow: publish, who: viewer, topics: "notes.#"}
  hardening:
    mode: audit
    rules:
      - {deny: publish, who: vehicles, topics: "vehicle.*.debug.#"}
"""


class Watch(SubscriberBehaviour):
    @on("vehicle.#")
    async def reading(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


class Notes(SubscriberBehaviour):
    @on("notes.#")
    async def note(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


class Vehicle(Host):
    @rpc("status")
    async def status(self, msg: Message, payload: object) -> dict[str, str]:
        return {"vehicle": self.id}


@pytest.fixture
async def as_principal(
    settings: Settings, tmp_path: Path
) -> AsyncIterator[Callable[[str], Settings]]:
    """Settings that enforce ``POLICY`` and connect as a principal's broker user (made here,
    with full rights on the test's vhost: what the broker enforces is tested elsewhere)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    api = ManagementAPI.for_settings(settings)
    made: list[str] = []

    def settings_for(principal: str) -> Settings:
        user = broker_user(settings.namespace, principal)
        password = secrets.token_urlsafe(16)
        made.append(user)
        return settings.model_copy(
            update={
                "amqp_url": url_as(settings.amqp_url, user, password),
                "policy": str(policy),
            }
        )

    try:
        yield settings_for
    finally:
        for user in made:
            await api.delete_user(user)


async def provision(settings: Settings, *principals: Settings) -> None:
    api = ManagementAPI.for_settings(settings)
    for each in principals:
        url = urlsplit(each.amqp_url)
        assert url.username and url.password
        user, password = url.username, url.password
        await api.put_user(user, password)
        await api.set_permissions(vhost_of(settings), user, ".*", ".*", ".*")


async def _dead_letter_of(broker: Peek, message_id: str) -> AbstractIncomingMessage:
    while True:
        dead = await broker.dead_letter()
        if mesh_id(dead) == message_id:
            return dead


async def _not_dead_lettered(broker: Peek, *message_ids: str) -> None:
    """A denial is audited, not dead-lettered: none of ``message_ids`` is in ``mesh.dead``."""
    dead = {mesh_id(d) for d in await broker.dead_letters_through_marker()}
    assert dead.isdisjoint(message_ids)


async def test_the_policy_decides_what_passes(
    settings: Settings,
    as_principal: Callable[[str], Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw, vehicles = as_principal("gateway"), as_principal("vehicles")
    monitor = as_principal("monitor")
    await provision(settings, gw, vehicles, monitor)
    v7 = Vehicle("v7", settings=vehicles)
    watcher = subscriber(monitor, Watch, agent_id="monitor")
    caplog.set_level(logging.WARNING, logger="mesh.gateway.authorize")
    async with running(Gateway(settings=gw), v7, watcher), peek(settings) as broker:
        notices = await broker.tap(topology.INTERNAL_EXCHANGE, "_err.v7.*")
        allowed = await v7.publish("vehicle.v7.speed", {"kmh": 80})
        [seen] = await take(watcher.seen, 1)
        assert seen.topic == "vehicle.v7.speed"
        record = await decision_of(settings, allowed)
        assert (record.decision, record.principal) == ("allowed", "vehicles")

        # A vehicle speaks for itself only: denied with the rule's reason, audited for its
        # principal and broker user, the sender told, and not dead-lettered.
        denied = await v7.publish("vehicle.v8.speed", {"kmh": 80})
        record = await decision_of(settings, denied)
        assert (record.decision, record.stage) == ("denied", "authorize")
        assert record.reason is not None
        assert record.reason.startswith("publish 'vehicle.v8.speed'")
        assert (record.principal, record.delegated_by) == ("vehicles", None)
        assert record.user == broker_user(settings.namespace, "vehicles")
        assert (record.agent, record.topic) == ("v7", "vehicle.v8.speed")
        notice = json.loads((await broker.get(notices)).body)
        assert (notice["message_id"], notice["stage"], notice["error"]) == (
            denied, "authorize", record.reason
        )

        # Audit mode: would deny, passes, logged and audited as would-deny.
        debug = await v7.publish("vehicle.v7.debug.trace", {})
        [seen] = await take(watcher.seen, 1)
        assert seen.message_id == debug
        assert any("would deny publish 'vehicle.v7.debug.trace'" in r.getMessage()
                   for r in caplog.records)
        record = await decision_of(settings, debug)
        assert (record.decision, record.stage, record.principal) == (
            "would-deny", "authorize", "vehicles"
        )
        assert record.reason is not None
        assert record.reason.startswith("publish 'vehicle.v7.debug.trace'")

        # Requests: the monitor may ask a vehicle; a vehicle may not ask another.
        assert await watcher.request("v7", "status", {}, timeout=10) == {"vehicle": "v7"}
        v8 = Vehicle("v8", settings=vehicles)
        async with running(v8):
            with pytest.raises(RemoteError) as caught:
                await v8.request("v7", "status", {}, timeout=30)
        assert caught.value.error_type == "Denied"
        assert "denied" in caught.value.detail
        await _not_dead_lettered(broker, denied)
    # The denied event never reached the monitor.
    assert watcher.seen.empty()


async def test_an_agent_cannot_speak_as_another_principal(
    settings: Settings, as_principal: Callable[[str], Settings]
) -> None:
    """Broker user ``<ns>.vehicles`` claiming app_id ``monitor`` is refused."""
    gw, vehicles = as_principal("gateway"), as_principal("vehicles")
    monitor = as_principal("monitor")
    await provision(settings, gw, vehicles, monitor)
    impostor = Agent("monitor", settings=vehicles)
    async with running(Gateway(settings=gw), impostor), peek(settings) as broker:
        sent = await impostor.publish("vehicle.v7.speed", {"kmh": 1})
        record = await decision_of(settings, sent)
        await _not_dead_lettered(broker, sent)
    assert (record.decision, record.stage) == ("denied", "authorize")
    assert record.reason is not None
    assert "belongs to principal 'monitor'" in record.reason
    assert broker_user(settings.namespace, "vehicles") in record.reason
    # The user RabbitMQ verified, and no principal: it is not the one it claims.
    assert (record.agent, record.principal) == ("monitor", None)
    assert record.user == broker_user(settings.namespace, "vehicles")


async def test_only_a_delegating_principal_may_act_on_behalf_of_another(
    settings: Settings, as_principal: Callable[[str], Settings]
) -> None:
    gw, vehicles, bridge, monitor = (
        as_principal("gateway"),
        as_principal("vehicles"),
        as_principal("bridge"),
        as_principal("monitor"),
    )
    await provision(settings, gw, vehicles, bridge, monitor)
    v7 = Vehicle("v7", settings=vehicles)
    relay = Agent("bridge", settings=bridge)
    reader = subscriber(monitor, Notes, agent_id="monitor")
    async with running(Gateway(settings=gw), v7, relay, reader), peek(settings) as broker:
        note = await relay.publish("notes.today", {}, headers={H_ON_BEHALF_OF: "viewer"})
        [seen] = await take(reader.seen, 1)
        assert seen.message_id == note
        # Decided for the token principal, delegated by the bridge.
        record = await decision_of(settings, note)
        assert record.decision == "allowed"
        assert (record.principal, record.delegated_by) == ("viewer", "bridge")
        assert record.user == broker_user(settings.namespace, "bridge")

        forged = await v7.publish("vehicle.v7.speed", {}, headers={H_ON_BEHALF_OF: "viewer"})
        record = await decision_of(settings, forged)
        await _not_dead_lettered(broker, forged)
    assert (record.decision, record.stage) == ("denied", "authorize")
    assert record.reason is not None
    assert "may not act on behalf of others" in record.reason
    # Refused as itself: no delegation was accepted.
    assert (record.principal, record.delegated_by) == ("vehicles", None)


async def test_operators_control_agents_and_agents_do_not(
    settings: Settings, as_principal: Callable[[str], Settings]
) -> None:
    gw, vehicles, ops = as_principal("gateway"), as_principal("vehicles"), as_principal("ops")
    await provision(settings, gw, vehicles, ops)
    v7, v8 = Vehicle("v7", settings=vehicles), Vehicle("v8", settings=vehicles)
    operator = Client(settings=ops)
    async with running(Gateway(settings=gw), v7, v8, operator):
        [answer] = await operator.control("v7", "ping", timeout=10, expect=1)
        assert answer.app_id == "v7"
        # An ordinary agent cannot tell another, or every agent, to shut down: the gateway
        # refuses it at once.
        [refusal] = await v8.control("v7", "shutdown", timeout=10, expect=1)
        assert refusal.payload["type"] == "Denied"
        [refusal] = await v8.control("_all", "shutdown", timeout=10, expect=1)
        assert refusal.payload["type"] == "Denied"
        assert "_ctl._all.shutdown" in refusal.payload["error"]
        assert not v7.should_stop and not v8.should_stop


async def test_without_a_policy_the_gateway_says_identities_are_not_enforced(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with running(Gateway(settings=settings)):
        pass
    assert any("open mode" in r.getMessage() for r in caplog.records)


async def test_a_dead_letter_names_the_broker_user_that_sent_it(
    settings: Settings, as_principal: Callable[[str], Settings]
) -> None:
    """``x-mesh-dead-by`` is claimed; ``x-mesh-dead-by-user`` is the user RabbitMQ verified,
    so a dead letter forged in another agent's name shows who really sent it."""
    gw, vehicles = as_principal("gateway"), as_principal("vehicles")
    monitor = as_principal("monitor")
    await provision(settings, gw, vehicles, monitor)
    v7 = Vehicle("v7", settings=vehicles)
    forger = Agent("monitor", settings=monitor)
    async with running(Gateway(settings=gw), v7, forger), peek(settings) as broker:
        forged = forger._message("vehicle.v7.speed", {"kmh": 1})
        amqp = to_amqp(forged, user_id=forger.transport.user)
        amqp.headers[H_DEAD_BY] = "v7"
        await forger.transport.publish(topology.DEAD_LETTER_EXCHANGE, "vehicle.v7.speed", amqp)
        dead = await _dead_letter_of(broker, forged.message_id)
    headers = dead.headers or {}
    assert headers[H_DEAD_BY] == "v7"  # the claim
    assert headers[H_DEAD_BY_USER] == broker_user(settings.namespace, "monitor")  # the truth
