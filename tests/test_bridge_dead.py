"""The bridge's ``GET /dead`` and ``POST /dead/{id}/redrive``: dead letters listed to, and
redriven for, callers the policy lets request the gateway's ``redrive``, on a provisioned
mesh (the bridge reads ``mesh.dead`` with its own broker user; the gateway redrives on the
caller's behalf and audits both names)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from agents_reliability import Host, host
from audit_support import redrive_records
from bridge_support import CONFIG, KEY, Mesh, delete_users, provisioned
from helpers import eventually, running

from behaviours import SubscriberBehaviour
from mesh import Message, Settings, on
from mesh.bridge import Bridge, create_app
from mesh.gateway import Gateway
from mesh.policy import TokenStore, broker_user

POLICY = """\
principals:
  gateway: {kind: gateway}
  bridge: {kind: bridge}
  tallies: {kind: agent, agents: [tally]}
  ops: {kind: user}
  viewer: {kind: user}
rule_sets:
  main:
    rules:
      - {allow: publish, who: [ops, viewer], topics: "orders.#"}
      - {allow: subscribe, who: tallies, topics: "orders.#"}
      - {allow: request, who: ops, request: {agent: gateway, operation: redrive}}
      - {allow: reply, who: "*", reply: {agent: "*"}}
"""
"""``ops`` may redrive (and so list dead letters); ``viewer`` may only publish."""

QUEUE = "mesh.q.tally.count"


class Count(SubscriberBehaviour):
    """Fails while its agent is ``failing``; one attempt, then the message is dead."""

    max_deliveries = 1

    @on("orders.#")
    async def item(self, msg: Message, payload: dict[str, Any]) -> None:
        agent = host(self)
        if getattr(agent, "failing", True):
            raise RuntimeError("the tally is closed")
        agent.seen.put_nowait(msg)


class Tally(Host):
    behaviours = [Count]
    failing = True


@dataclass
class Live:
    mesh: Mesh
    tally: Tally
    client: httpx.AsyncClient

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.mesh.token(user)}"}

    async def dead(self, user: str = "ops", **params: str) -> httpx.Response:
        return await self.client.get("/dead", params=params, headers=self.auth(user))

    async def redrive(self, id: int, user: str = "ops", **params: str) -> httpx.Response:
        return await self.client.post(
            f"/dead/{id}/redrive", params=params, headers=self.auth(user)
        )


@pytest.fixture
async def live(settings: Settings, tmp_path: Path) -> AsyncIterator[Live]:
    try:
        mesh = await provisioned(settings, tmp_path, POLICY)
        tally = Tally("tally", settings=mesh.under("tallies"))
        gateway = Gateway(settings=mesh.under("gateway").model_copy(update={"audit_key": KEY}))
        bridge = Bridge(
            mesh.under("bridge"), CONFIG, mesh.policy, tokens=TokenStore.for_policy(mesh.policy)
        )
        async with running(gateway, tally), bridge:
            transport = httpx.ASGITransport(app=create_app(bridge))
            async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as client:
                yield Live(mesh, tally, client)
    finally:
        await delete_users(settings)


async def listed(live: Live, message_id: str) -> dict[str, Any]:
    """The dead letter of ``message_id`` as ``GET /dead`` lists it, once it was filed."""
    found: list[dict[str, Any]] = []

    async def filed() -> bool:
        answer = await live.dead(topic="orders.#")
        assert answer.status_code == 200, answer.text
        found[:] = [d for d in answer.json()["dead_letters"] if d["message_id"] == message_id]
        return bool(found)

    await eventually(filed, timeout=20, what=f"dead letter of {message_id} listed")
    return found[0]



async def test_a_dead_letter_is_listed_and_redriven_for_the_caller(live: Live) -> None:
    ns = live.mesh.settings.namespace
    sent = await live.client.post(
        "/topics/orders.eu.new", json={"order": 1}, headers=live.auth("viewer")
    )
    assert sent.status_code == 202, sent.text
    message_id = sent.json()["message_id"]

    dead = await listed(live, message_id)
    assert (dead["queue"], dead["topic"], dead["type"]) == (QUEUE, "orders.eu.new", "event")
    assert "handler count.item failed" in dead["reason"]
    assert "RuntimeError: the tally is closed" in dead["reason"]
    assert dead["dead_by_user"] == broker_user(ns, "tallies")
    assert dead["sender"] == "bridge" and dead["redriven"] is None
    assert (await live.dead(queue="mesh.q.other.count")).json()["dead_letters"] == []

    live.tally.failing = False
    answer = await live.redrive(dead["id"])
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["id"], result["outcome"], result["queue"]) == (dead["id"], "redriven", QUEUE)
    again = await asyncio.wait_for(live.tally.seen.get(), 15)
    assert (again.message_id, again.topic, again.payload) == (
        message_id,
        "orders.eu.new",
        {"order": 1},
    )

    [entry] = [e for e in await redrive_records(live.mesh.settings) if e.record.message_id]
    record = entry.record
    assert (record.decision, record.principal, record.delegated_by) == ("allowed", "ops", "bridge")
    assert record.user == broker_user(ns, "bridge") and record.message_id == message_id
    assert result["audit"] == f"{entry.chain}/{entry.id}"

    marked = await listed(live, message_id)
    assert marked["redriven"]["on_behalf_of"] == "ops"
    assert marked["redriven"]["user"] == broker_user(ns, "bridge")

    twice = await live.redrive(dead["id"])
    assert twice.status_code == 409, twice.text
    assert "redriven already" in twice.json()["error"]
    assert twice.json()["type"] == "Conflict"


async def test_callers_without_the_redrive_rule_get_403_and_unknown_ids_404(
    live: Live,
) -> None:
    listing = await live.dead("viewer")
    assert listing.status_code == 403, listing.text
    assert "_req.gateway.redrive" in listing.json()["error"]
    refused = await live.redrive(0, "viewer")
    assert refused.status_code == 403, refused.text
    assert "_req.gateway.redrive" in refused.json()["error"]

    unknown = await live.redrive(10**9)
    assert unknown.status_code == 404, unknown.text
    assert "holds no dead letter 1000000000" in unknown.json()["error"]
    assert (await live.redrive(0, again="maybe")).status_code == 400
    bad = await live.client.post("/dead/-1/redrive", headers=live.auth("ops"))
    assert bad.status_code == 400 and bad.json()["type"] == "BadRequest"
    assert (await live.dead(limit="0")).status_code == 400
    assert (await live.dead(topic="orders..#")).status_code == 400
    assert (await live.dead()).json() == {"dead_letters": [], "complete": True}
