"""The gateway's schema stage on a real mesh: with a policy that declares schemas, events and
requests pass when their payload follows the version they name, and are denied otherwise,
with the JSON path and reason reaching the sender."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from agents_reliability import Host, host, mesh_id, peek, subscriber
from helpers import decision_of, mesh_cli, principals, running, take

from behaviours import SubscriberBehaviour
from mesh import Message, RemoteError, Settings, on, rpc, topology
from mesh.gateway import Gateway
from mesh.gateway.relay import Relay

POLICY = """
principals:
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
  monitor: {kind: agent}
  gateway: {kind: gateway}
  ops: {kind: operator, agents: ["client-*"]}
rule_sets:
  telemetry:
    rules:
      - {allow: publish, who: vehicles, topics: "vehicle.{self}.#"}
      - {allow: publish, who: ops, topics: "vehicle.#"}
      - {allow: subscribe, who: monitor, topics: "vehicle.#"}
      - {allow: request, who: [monitor, ops], request: {agent: "v[0-9]*", operation: status}}
      - {allow: reply, who: "*", reply: {agent: "*"}}
schemas:
  definitions:
    reading:
      - version: 1
        inline:
          type: object
          properties:
            vehicle: {type: string}
            speed_kmh: {type: number}
          required: [vehicle, speed_kmh]
      - version: 2
        model: payloads:Reading
    status:
      - version: 1
        file: status.json
  payloads:
    - topics: "vehicle.*.speed"
      accept: [reading@1, reading@2]
    - request: {agent: "v[0-9]*", operation: status}
      accept: status
  require: ["vehicle.#"]
"""

Principal = Callable[[str], Awaitable[Settings]]
"""Settings for a principal's broker user (the ``as_principal`` fixture)."""

STATUS = {"type": "object", "properties": {"verbose": {"type": "boolean"}}}


class Watch(SubscriberBehaviour):
    @on("vehicle.#")
    async def reading(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


class Vehicle(Host):
    @rpc("status")
    async def status(self, msg: Message, payload: object) -> dict[str, str]:
        self.seen.put_nowait(msg)
        return {"vehicle": self.id}


@pytest.fixture
async def as_principal(settings: Settings, tmp_path: Path) -> AsyncIterator[Principal]:
    """Settings that enforce ``POLICY`` and connect as a principal's broker user."""
    (tmp_path / "status.json").write_text(json.dumps(STATUS))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    async with principals(settings, policy) as settings_for:
        yield settings_for


async def schema_denial(settings: Settings, message_id: str) -> str:
    """The reason the schema stage denied ``message_id`` for, from the audit trail."""
    record = await decision_of(settings, message_id)
    assert (record.decision, record.stage) == ("denied", "schema")
    assert record.reason is not None
    return record.reason


async def test_events_follow_the_schema_version_they_name_or_are_denied(
    as_principal: Principal, tmp_path: Path
) -> None:
    gw, vehicles, monitor = [await as_principal(p) for p in ("gateway", "vehicles", "monitor")]
    v7 = Vehicle("v7", settings=vehicles)
    watcher = subscriber(monitor, Watch, agent_id="monitor")
    gateway = Gateway(settings=gw)
    async with running(gateway, v7, watcher), peek(gw) as broker:
        notices = await broker.tap(topology.INTERNAL_EXCHANGE, "_err.v7.*")
        reading = {"vehicle": "v7", "speed_kmh": 88.5}
        await v7.publish("vehicle.v7.speed", reading, schema="reading@1")
        [seen] = await take(watcher.seen, 1)
        assert (seen.payload, seen.schema_id) == (reading, "reading@1")

        # A failing payload: denied with the path and reason, audited, and the sender told.
        bad = await v7.publish(
            "vehicle.v7.speed", {"vehicle": "v7", "speed_kmh": "fast"}, schema="reading@1"
        )
        expected = "payload.speed_kmh: a string is not of type 'number' (reading@1)"
        record = await decision_of(gw, bad)
        assert (record.decision, record.stage, record.reason) == ("denied", "schema", expected)
        assert (record.principal, record.agent) == ("vehicles", "v7")
        notice = json.loads((await broker.get(notices)).body)
        assert notice == {
            "error": expected,
            "type": "Denied",
            "stage": "schema",
            "message_id": bad,
            "audit": notice["audit"],
        }
        assert isinstance(notice["audit"], str) and notice["audit"]

        # Version 2 is the pydantic model, which bounds the speed.
        too_fast = await v7.publish(
            "vehicle.v7.speed", {"vehicle": "v7", "speed_kmh": 500}, schema="reading@2"
        )
        assert (await schema_denial(gw, too_fast)).endswith(
            "payload.speed_kmh: a number is greater than the maximum of 400 (reading@2)"
        )
        unnamed = await v7.publish("vehicle.v7.speed", reading)
        assert (await schema_denial(gw, unnamed)).endswith(
            "the message names no schema (x-mesh-schema); 'vehicle.v7.speed' accepts "
            "reading@1, reading@2"
        )
        unknown = await v7.publish("vehicle.v7.speed", reading, schema="reading@7")
        assert (await schema_denial(gw, unknown)).endswith(
            "x-mesh-schema 'reading@7' is not accepted on 'vehicle.v7.speed' "
            "(accepted: reading@1, reading@2)"
        )
        unchecked = await v7.publish("vehicle.v7.debug", {"trace": 1})
        assert (await schema_denial(gw, unchecked)).endswith(
            "the policy requires a schema on 'vehicle.v7.debug' (require: 'vehicle.#') and "
            "declares none for it"
        )
        # None of them was dead-lettered: a denial is the audit trail's.
        dead = {mesh_id(d) for d in await broker.dead_letters_through_marker()}
        assert dead.isdisjoint({bad, too_fast, unnamed, unknown, unchecked})

        # Only what passed arrives, in order.
        await v7.publish("vehicle.v7.speed", {**reading, "speed_kmh": 90}, schema="reading@2")
        [seen] = await take(watcher.seen, 1)
        assert (seen.payload["speed_kmh"], seen.schema_id) == (90, "reading@2")
    assert watcher.seen.empty()


async def test_a_request_whose_payload_fails_gets_remote_error_with_the_path(
    as_principal: Principal,
) -> None:
    gw, vehicles, monitor = [await as_principal(p) for p in ("gateway", "vehicles", "monitor")]
    v7 = Vehicle("v7", settings=vehicles)
    caller = subscriber(monitor, Watch, agent_id="monitor")
    async with running(Gateway(settings=gw), v7, caller):
        with pytest.raises(RemoteError) as caught:
            await caller.request("v7", "status", {"verbose": "yes"}, schema="status@1", timeout=20)
        assert caught.value.error_type == "Denied"
        assert caught.value.detail == (
            "payload.verbose: a string is not of type 'boolean' (status@1)"
        )
        with pytest.raises(RemoteError) as caught:
            await caller.request("v7", "status", {}, timeout=20)
        assert caught.value.detail == (
            "the message names no schema (x-mesh-schema); '_req.v7.status' accepts status@1"
        )
        assert v7.seen.empty()  # the handler never ran

        answer = await caller.request(
            "v7", "status", {"verbose": True}, schema="status@1", timeout=20
        )
        assert answer == {"vehicle": "v7"}
        [handled] = await take(v7.seen, 1)
        assert handled.schema_id == "status@1"


async def test_the_stage_runs_after_authorize_only_when_the_policy_declares_schemas(
    settings: Settings, tmp_path: Path
) -> None:
    with_schemas = tmp_path / "with.yaml"
    (tmp_path / "status.json").write_text(json.dumps(STATUS))
    with_schemas.write_text(POLICY)
    without = tmp_path / "without.yaml"
    without.write_text(POLICY.partition("schemas:")[0])

    def stages(policy: Path) -> list[str]:
        gateway = Gateway(settings=settings.model_copy(update={"policy": str(policy)}))
        relay = gateway.behaviour_map[Relay.name]
        assert isinstance(relay, Relay)
        return [stage.name for stage in relay.pipeline.stages]

    names = stages(with_schemas)
    assert names.index("schema") == names.index("authorize") + 1
    assert "schema" not in stages(without)


async def test_mesh_call_and_publish_name_the_schema_version(as_principal: Principal) -> None:
    gw, vehicles, monitor, ops = [
        await as_principal(p) for p in ("gateway", "vehicles", "monitor", "ops")
    ]
    v7 = Vehicle("v7", settings=vehicles)
    watcher = subscriber(monitor, Watch, agent_id="monitor")
    async with running(Gateway(settings=gw), v7, watcher):
        # A generous timeout: the command runs in a process of its own on a busy machine.
        code, out, err = await mesh_cli(
            ops, "call", "v7", "status", '{"verbose": "yes"}', "--schema", "status@1",
            "--timeout", "30",
        )
        assert code == 1, err
        assert "payload.verbose: a string is not of type 'boolean' (status@1)" in err, err
        code, out, err = await mesh_cli(
            ops, "call", "v7", "status", '{"verbose": true}', "--schema", "status@1",
            "--timeout", "30",
        )
        assert (code, json.loads(out)) == (0, {"vehicle": "v7"}), err
        reading = '{"vehicle": "v7", "speed_kmh": 1}'
        code, out, err = await mesh_cli(
            ops, "publish", "vehicle.v7.speed", reading, "--schema", "reading@1"
        )
        assert code == 0, err
        [seen] = await take(watcher.seen, 1)
        assert (seen.message_id, seen.schema_id) == (out.strip(), "reading@1")
