"""``mesh dead``: dead letters listed and shown from the ``mesh.dead`` stream, and redriven by
the gateway into their queues, only in their queue owner's name, audited and marked once.

The mesh runs as provisioning makes it: every principal's broker user holds only its compiled
permissions, so the operator's command cannot write to an agent's queue itself.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from agents_reliability import Host, host
from audit_support import redrive_records
from click.testing import CliRunner
from helpers import eventually, mesh_cli, running

from behaviours import SubscriberBehaviour
from mesh import Client, Message, RemoteError, Settings, on, topology
from mesh.cli import main
from mesh.deadlist import DeadLetter, read_dead_letters, stream_end
from mesh.envelope import H_DEAD_BY, H_QUEUE, H_REASON, H_TOPIC, new_message_id
from mesh.gateway import Gateway
from mesh.management import ManagementAPI, vhost_of
from mesh.policy import broker_user, load_policy
from mesh.provision.credentials import url_as
from mesh.provision.plan import build_plan
from mesh.redrive import RedriveRequest, queue_agent

POLICY = """
principals:
  gateway: {kind: gateway}
  tallies: {kind: agent, agents: [tally]}
  forger: {kind: agent}
  ops: {kind: operator, agents: ["client-*"]}
rule_sets:
  mesh:
    rules:
      - {allow: publish, who: ops, topics: "#"}
      - {allow: subscribe, who: tallies, topics: ["orders.#", "refunds.#"]}
      - {allow: request, who: [ops, forger], request: {agent: gateway, operation: redrive}}
      - {allow: reply, who: "*", reply: {agent: "*"}}
"""

QUEUE = "mesh.q.tally.count"


class Count(SubscriberBehaviour):
    """Fails what asks to fail while the agent is ``failing``; one attempt, then dead."""

    max_deliveries = 1

    @on("orders.#")
    @on("refunds.#")
    async def item(self, msg: Message, payload: dict[str, Any]) -> None:
        agent = host(self)
        if payload.get("fail") and getattr(agent, "failing", False):
            raise RuntimeError("the tally is closed")
        agent.seen.put_nowait(msg)


class Tally(Host):
    behaviours = [Count]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing = True


@dataclass
class Mesh:
    """A provisioned mesh: a gateway, the tally, the forger, an operator's client."""

    settings: Settings
    """The test's own (guest, every right): for reading the stream and Redis."""
    ops: Settings
    tally: Tally
    forger: Client
    operator: Client

    async def cli(self, *args: str) -> tuple[int, str, str]:
        """``mesh ARGS`` as the operator."""
        return await mesh_cli(self.ops, *args)

    async def publish(self, topic: str, payload: dict[str, Any]) -> str:
        return await self.operator.publish(topic, payload)

    async def handled(self) -> Message:
        return await asyncio.wait_for(self.tally.seen.get(), 15)

    async def nothing_more_handled(self) -> None:
        """The tally handles nothing before a message sent now: anything sent into its queue
        earlier would have come first."""
        probe = await self.publish("orders.probe", {"probe": secrets.token_hex(4)})
        assert (await self.handled()).message_id == probe


async def dead_letters(settings: Settings) -> list[DeadLetter]:
    """Every dead letter in ``mesh.dead`` now."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        end = await stream_end(channel)
        return [] if end is None else [d async for d in read_dead_letters(channel, end)]


async def dead_letter_of(settings: Settings, message_id: str) -> DeadLetter:
    """The dead letter of ``message_id``, once a gateway filed it."""
    found: list[DeadLetter] = []

    async def filed() -> bool:
        found[:] = [d for d in await dead_letters(settings) if d.message_id == message_id]
        return bool(found)

    await eventually(filed, timeout=20, what=f"dead letter of {message_id} filed")
    return found[0]



@pytest.fixture
async def mesh(settings: Settings, tmp_path: Path) -> AsyncIterator[Mesh]:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    plan = build_plan(load_policy(policy_file), settings.namespace, vhost_of(settings))
    api = ManagementAPI.for_settings(settings)
    as_principal: dict[str, Settings] = {}
    try:
        for user in plan.users:
            password = secrets.token_urlsafe(16)
            await api.put_user(user.name, password, user.tags)
            p = user.permissions
            await api.set_permissions(vhost_of(settings), user.name, p.configure, p.write, p.read)
            for t in p.topics:
                await api.set_topic_permissions(
                    vhost_of(settings), user.name, t.exchange, t.write, t.read
                )
            as_principal[user.principal.name] = settings.model_copy(
                update={
                    "amqp_url": url_as(settings.amqp_url, user.name, password),
                    "policy": str(policy_file),
                }
            )
        ops = as_principal["ops"]
        mesh = Mesh(
            settings,
            ops,
            Tally("tally", settings=as_principal["tallies"]),
            Client("forger", settings=as_principal["forger"]),
            Client(settings=ops),
        )
        gateway = Gateway(settings=as_principal["gateway"])
        async with running(gateway, mesh.tally, mesh.forger, mesh.operator):
            yield mesh
    finally:
        for user in plan.users:
            await api.delete_user(user.name)


async def test_list_and_show_then_redrive_is_handled_again_audited_and_marked(
    mesh: Mesh,
) -> None:
    sent = await mesh.publish("orders.eu.new", {"order": 1, "fail": True})
    other = await mesh.publish("refunds.eu", {"refund": 2, "fail": True})
    dead = await dead_letter_of(mesh.settings, sent)
    await dead_letter_of(mesh.settings, other)
    ns = mesh.settings.namespace

    code, out, err = await mesh.cli("dead", "list")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["ID", "WHEN", "QUEUE", "TOPIC", "REASON"]
    assert "DEAD-LETTERED BY" in header
    [row] = [r for r in rows if r.split()[0] == str(dead.offset)]
    assert QUEUE in row and "orders.eu.new" in row and "handler count.item failed" in row
    assert f"({broker_user(ns, 'ops')})" in row  # the sender's verified user
    assert broker_user(ns, "tallies") in row  # who dead-lettered it, as the broker saw it

    code, out, err = await mesh.cli("dead", "list", "--json", "--topic", "orders.#")
    assert code == 0, err
    [listed] = json.loads(out)
    assert listed["id"] == dead.offset
    assert listed["message_id"] == sent
    assert (listed["queue"], listed["topic"], listed["type"]) == (QUEUE, "orders.eu.new", "event")
    assert listed["dead_by_user"] == broker_user(ns, "tallies")
    assert listed["sender_user"] == broker_user(ns, "ops")
    assert listed["filed_at"] and listed["redriven"] is None
    assert "RuntimeError: the tally is closed" in listed["reason"]

    code, out, err = await mesh.cli("dead", "show", str(dead.offset))
    assert code == 0, err
    assert f"dead letter {dead.offset}" in out
    assert '"order": 1' in out and "x-mesh-reason" in out and "properties:" in out
    code, out, err = await mesh.cli("dead", "show", str(dead.offset), "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["payload"] == {"order": 1, "fail": True}
    assert shown["headers"]["x-mesh-queue"] == QUEUE
    assert shown["properties"]["app_id"] == mesh.operator.id

    mesh.tally.failing = False
    code, out, err = await mesh.cli("dead", "redrive", str(dead.offset))
    assert code == 0, (out, err)
    assert f"{dead.offset}  redriven  {QUEUE}" in out
    again = await mesh.handled()
    assert (again.message_id, again.topic, again.payload) == (
        sent,
        "orders.eu.new",
        {"order": 1, "fail": True},
    )
    assert again.attempt == 1 and again.user_id == broker_user(ns, "ops")

    [entry] = await redrive_records(mesh.settings)
    record = entry.record
    assert (record.decision, record.principal, record.message_id) == ("allowed", "ops", sent)
    assert record.user == broker_user(ns, "ops") and record.topic == "orders.eu.new"
    assert f"(audit {entry.chain}/{entry.id})" in out

    code, out, err = await mesh.cli("dead", "redrive", str(dead.offset))
    assert code == 1 and "redriven already" in out and "--again" in out
    code, out, err = await mesh.cli("dead", "redrive", str(dead.offset), "--again", "--dry-run")
    assert code == 0 and f"{dead.offset}  would redrive" in out
    await mesh.nothing_more_handled()  # neither the refused redrive nor the dry run sent it
    assert [e.record.decision for e in await redrive_records(mesh.settings)] == [
        "allowed",
        "denied",
    ]


async def test_a_forged_dead_letter_is_not_redriven(mesh: Mesh) -> None:
    """The forger dead-letters a message naming the tally's queue and agent: RabbitMQ's
    verified user says it was the forger, so the gateway refuses to put it in that queue."""
    forger = mesh.forger
    forged = aio_pika.Message(
        json.dumps({"order": 666}).encode(),
        headers={
            H_QUEUE: QUEUE,
            H_DEAD_BY: "tally",
            H_REASON: "handler count.item failed 1 times",
            H_TOPIC: "orders.eu.new",
        },
        message_id=new_message_id(),
        type="event",
        app_id="tally",
        user_id=forger.transport.user,
    )
    await forger.transport.publish(topology.DEAD_LETTER_EXCHANGE, "orders.eu.new", forged)
    assert forged.message_id is not None
    dead = await dead_letter_of(mesh.settings, forged.message_id)
    ns = mesh.settings.namespace
    assert dead.queue == QUEUE and dead.dead_by == "tally"  # what it claims
    assert dead.dead_by_user == broker_user(ns, "forger")  # what the broker saw

    code, out, err = await mesh.cli("dead", "redrive", str(dead.offset))
    assert code == 1, (out, err)
    assert f"{dead.offset}  refused  {QUEUE}" in out
    assert f"dead-lettered by user {broker_user(ns, 'forger')}, not by" in out
    [entry] = await redrive_records(mesh.settings)
    record = entry.record
    assert (record.decision, record.stage, record.principal) == ("denied", "redrive", "ops")
    code, out, err = await mesh.cli("dead", "list", "--json")
    assert next(d for d in json.loads(out) if d["id"] == dead.offset)["redriven"] is None
    await mesh.nothing_more_handled()

    # Nor may the forger redrive anything itself, though the policy lets it ask: only an
    # operator principal redrives.
    with pytest.raises(RemoteError) as refused:
        await forger.request(
            "gateway", "redrive", RedriveRequest(ids=[dead.offset]).model_dump(), timeout=15
        )
    assert refused.value.error_type == "RedriveRefused"
    assert [e.record.decision for e in await redrive_records(mesh.settings)] == [
        "denied",
        "denied",
    ]


async def test_redrive_all_by_topic(mesh: Mesh) -> None:
    sent = {
        await mesh.publish("orders.eu.new", {"n": 1, "fail": True}),
        await mesh.publish("orders.us.new", {"n": 2, "fail": True}),
    }
    refund = await mesh.publish("refunds.eu", {"n": 3, "fail": True})
    for message_id in (*sent, refund):
        await dead_letter_of(mesh.settings, message_id)
    mesh.tally.failing = False

    code, out, err = await mesh.cli("dead", "redrive", "--all", "--topic", "orders.#", "--dry-run")
    assert code == 0, (out, err)
    assert out.count("would redrive") == 2 and "refunds" not in out
    code, out, err = await mesh.cli("dead", "redrive", "--all", "--topic", "orders.#", "--json")
    assert code == 0, (out, err)
    assert [r["outcome"] for r in json.loads(out)] == ["redriven", "redriven"]
    assert {(await mesh.handled()).message_id for _ in range(2)} == sent
    await mesh.nothing_more_handled()  # the refund stayed dead

    code, out, err = await mesh.cli("dead", "list", "--json")
    marks = {d["topic"]: d["redriven"] for d in json.loads(out)}
    assert marks["refunds.eu"] is None
    for topic in ("orders.eu.new", "orders.us.new"):
        assert marks[topic]["user"] == broker_user(mesh.settings.namespace, "ops")
        assert marks[topic]["queue"] == QUEUE and marks[topic]["audit"]
    code, out, err = await mesh.cli("dead", "redrive", "--all", "--topic", "orders.#")
    assert (code, out.strip()) == (0, "no dead letters to redrive")


async def test_open_mode_redrives_only_with_force(settings: Settings) -> None:
    """Without a policy nothing says whose a queue is: the gateway refuses, unless forced."""
    tally = Tally("tally", settings=settings)
    operator = Client(settings=settings)
    async with running(Gateway(settings=settings), tally, operator):
        sent = await operator.publish("orders.eu.new", {"order": 1, "fail": True})
        dead = await dead_letter_of(settings, sent)
        tally.failing = False
        code, out, err = await mesh_cli(settings, "dead", "redrive", str(dead.offset))
        assert code == 1 and "open mode" in out and "--force" in out, (out, err)
        code, out, err = await mesh_cli(settings, "dead", "redrive", str(dead.offset), "--force")
        assert code == 0 and "redriven" in out, (out, err)
        assert (await asyncio.wait_for(tally.seen.get(), 15)).message_id == sent


@pytest.mark.parametrize(
    ("queue", "agent"),
    [
        ("mesh.q.tally.count", "tally"),
        ("mesh.i.tally.a1b2.watch", "tally"),
        ("mesh.i.tally.a1b2._inbox-1", None),
        ("mesh.q.tally._retry.1000", None),
        ("mesh.q.tally._retry", None),
        ("mesh.gateway", None),
        ("mesh.dead.incoming", None),
        ("other.q.tally.count", None),
    ],
)
def test_only_behaviour_queues_take_dead_letters_back(queue: str, agent: str | None) -> None:
    assert queue_agent(queue) == agent


def test_usage_errors() -> None:
    runner = CliRunner()
    for args, text in (
        (["dead", "redrive"], "name a dead letter's ID, or --all"),
        (["dead", "redrive", "3", "--all"], "name a dead letter's ID, or --all"),
        (["dead", "redrive", "3", "--topic", "a.#"], "pick dead letters for --all"),
        (["dead", "list", "--topic", "a..b"], "--topic"),
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and text in result.output, (args, result.output)

