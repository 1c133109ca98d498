"""Rate limits at a real gateway: the policy's ``rate_limits`` refuse a sender's excess with a
notice naming the limit and the wait, recorded in the audit trail and not dead-lettered."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from agents_reliability import Host, host, mesh_id, peek, subscriber
from helpers import decision_of, principals, running, take

from behaviours import SubscriberBehaviour
from mesh import Message, Settings, on, topology
from mesh.config import ConfigError
from mesh.gateway import Gateway
from mesh.gateway.relay import Relay
from mesh.policy import PolicyError, broker_user, load_policy

POLICY = """
principals:
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
  monitor: {kind: agent}
  ops: {kind: operator, agents: ["ops"]}
  gateway: {kind: gateway}
rule_sets:
  telemetry:
    rules:
      - {allow: publish, who: vehicles, topics: "vehicle.{self}.#"}
      - {allow: publish, who: ops, topics: "vehicle.#"}
      - {allow: subscribe, who: monitor, topics: "vehicle.#"}
rate_limits:
  telemetry: {who: vehicles, topics: "vehicle.#", rate: 1/min, burst: 2}
"""


class Watch(SubscriberBehaviour):
    @on("vehicle.#")
    async def reading(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


async def test_the_excess_is_refused_told_and_audited_not_dead_lettered(
    settings: Settings, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    async with principals(settings, policy) as settings_for:
        gateway = Gateway(settings=await settings_for("gateway"))
        relay = gateway.behaviour_map[Relay.name]
        assert isinstance(relay, Relay)
        names = [stage.name for stage in relay.pipeline.stages]
        assert names.index("rate-limit") == names.index("authorize") + 1
        v7 = Host("v7", settings=await settings_for("vehicles"))
        operator = Host("ops", settings=await settings_for("ops"))
        watcher = subscriber(await settings_for("monitor"), Watch, agent_id="monitor")
        async with running(gateway, v7, operator, watcher), peek(settings) as broker:
            notices = await broker.tap(topology.INTERNAL_EXCHANGE, "_err.v7.*")
            sent = [await v7.publish("vehicle.v7.speed", {"kmh": n}) for n in range(3)]
            passed, refused = sent[:2], sent[2]

            # The burst passes; the one over it is refused, and the sender told why and when.
            assert [m.message_id for m in await take(watcher.seen, 2)] == passed
            notice = json.loads((await broker.get(notices)).body)
            assert notice["message_id"] == refused
            assert (notice["type"], notice["stage"], notice["limit"]) == (
                "Denied", "rate-limit", "telemetry"
            )
            assert notice["error"].startswith(
                "limit 'telemetry' (1/min for vehicles on vehicle.#): retry after "
            )
            assert 50 < notice["retry_after"] <= 60

            # Audited as denied, for the sender's principal; the burst as allowed.
            record = await decision_of(settings, refused)
            assert (record.decision, record.stage, record.reason) == (
                "denied", "rate-limit", notice["error"]
            )
            assert record.principal == "vehicles"
            assert record.delegated_by is None
            assert record.user == broker_user(settings.namespace, "vehicles")
            assert (record.agent, record.topic) == ("v7", "vehicle.v7.speed")
            assert notice["audit"]  # the notice names the record
            assert (await decision_of(settings, passed[0])).decision == "allowed"

            # Not dead-lettered: a denial is the audit trail's, not mesh.dead's.
            dead = await broker.dead_letters_through_marker()
            assert refused not in [mesh_id(d) for d in dead]

            # Another principal is not limited by the vehicles' limit; the refused one never
            # arrives (it was decided, and dropped, before this was sent).
            after = await operator.publish("vehicle.v7.speed", {"kmh": 0})
            assert [m.message_id for m in await take(watcher.seen, 1)] == [after]
    assert watcher.seen.empty()


async def test_a_limit_naming_an_unknown_principal_fails_to_load(
    settings: Settings, tmp_path: Path
) -> None:
    """The file and line of the unknown name, from the loader and from the gateway."""
    policy = tmp_path / "policy.yaml"
    limit = '  telemetry: {who: vehicles, topics: "vehicle.#", rate: 1/min, burst: 2}'
    policy.write_text(POLICY.replace(limit, limit.replace("vehicles", "[vehicles, trucks]")))
    line = POLICY.splitlines().index(limit) + 1
    expected = f"{policy}:{line}: rate limit 'telemetry': unknown principal or role 'trucks'"
    with pytest.raises(PolicyError) as caught:
        load_policy(policy)
    [problem] = caught.value.lines()
    assert problem.startswith(expected)
    with pytest.raises(ConfigError, match=re.escape(f"MESH_POLICY: {expected}")):
        Gateway(settings=settings.model_copy(update={"policy": str(policy)}))
