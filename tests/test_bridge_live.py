"""The bridge's live stream, served by uvicorn: the websocket protocol (subscriptions the
policy allows, publish and request lifecycles, registry events), a slow client closed
without holding up the others, a revoked token, and the same stream as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import pytest
from bridge_support import (  # noqa: F401 (mesh_fixture)
    CONFIG,
    POLICY,
    Mesh,
    Running,
    mesh_fixture,
    running_bridge,
)
from helpers import eventually
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from mesh.bridge.outbox import SLOW_CLIENT
from mesh.bridge.websocket import UNAUTHORIZED
from mesh.policy import parse_policy


@asynccontextmanager
async def client(live: Running, user: str, **options: Any) -> AsyncIterator[ClientConnection]:
    """A websocket client of ``user``, past the welcome frame."""
    assert live.url is not None
    headers = live.auth(user)
    async with connect(f"ws://{live.url}/ws", additional_headers=headers, **options) as ws:
        welcome = await frame(ws)
        assert (welcome["type"], welcome["principal"]) == ("welcome", user)
        yield ws


async def frame(ws: ClientConnection, timeout: float = 15) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        text = await ws.recv(decode=True)
    parsed = json.loads(text)
    assert isinstance(parsed, dict)
    return parsed


async def ask(ws: ClientConnection, **op: Any) -> dict[str, Any]:
    """Send ``op`` and return the first frame about it (by ``id``)."""
    await ws.send(json.dumps(op))
    return await about(ws, op.get("id"))


async def about(ws: ClientConnection, op_id: str | None) -> dict[str, Any]:
    """The next frame about operation ``op_id``, skipping live messages."""
    while True:
        got = await frame(ws)
        if got["type"] not in ("message", "agent") and got.get("id") == op_id:
            return got


async def closed_with(ws: ClientConnection) -> int | None:
    """Read until the bridge closes ``ws``; its close code."""
    with pytest.raises(ConnectionClosed) as caught:
        while True:
            await frame(ws)
    return caught.value.rcvd.code if caught.value.rcvd else None


async def test_a_websocket_needs_a_valid_token(mesh: Mesh) -> None:
    async with running_bridge(mesh, serve=True) as live:
        async with connect(f"ws://{live.url}/ws") as anonymous:
            assert await closed_with(anonymous) == UNAUTHORIZED
        token = live.mesh.token("viewer")
        async with connect(f"ws://{live.url}/ws?access_token={token}") as browser:
            assert (await frame(browser))["principal"] == "viewer"
            live.mesh.revoke("viewer")
            # Revoked while connected: closed within the recheck interval (0.2 s here).
            assert await closed_with(browser) == UNAUTHORIZED


async def test_subscriptions_are_only_what_the_policy_allows(mesh: Mesh) -> None:
    async with running_bridge(mesh, serve=True) as live, client(live, "viewer") as ws:
        # readings.# is allowed, but could deliver readings.secret.#, which is denied.
        denied = await ask(ws, op="subscribe", id="s1", topics=["notes.#", "readings.#"])
        assert (denied["type"], denied["status"], denied["error_type"]) == (
            "error", 403, "Forbidden"
        )
        assert denied["error"].startswith("subscribe 'readings.#': denied by main rule 4")
        assert live.bridge.stream.bound == []  # all or nothing
        bad = await ask(ws, op="subscribe", id="s2", topics=["notes.#.#x"])
        assert (bad["type"], bad["status"]) == ("error", 400)

        ok = await ask(ws, op="subscribe", id="s3", topics=["notes.public.*"])
        assert ok == {
            "type": "subscribed", "id": "s3", "topics": ["notes.public.*"], "agents": False
        }
        assert live.bridge.stream.bound == ["notes.public.*"]
        await live.service.publish("notes.public.one", {"n": 1})
        await live.service.publish("notes.private.two", {"n": 2})
        await live.service.publish("notes.public.three", {"n": 3})
        seen = [await frame(ws), await frame(ws)]
        assert [(f["type"], f["topic"], f["payload"]) for f in seen] == [
            ("message", "notes.public.one", {"n": 1}),
            ("message", "notes.public.three", {"n": 3}),
        ]
        assert (seen[0]["sender"], seen[0]["user"]) == (
            "svc",
            f"{mesh.settings.namespace}.service",
        )
        gone = await ask(ws, op="unsubscribe", id="u1", topics=["notes.public.*"])
        assert gone["type"] == "unsubscribed" and gone["topics"] == []
        await eventually(lambda: live.bridge.stream.bound == [])


async def test_publish_and_request_lifecycles(mesh: Mesh) -> None:
    async with running_bridge(mesh, serve=True) as live, client(live, "viewer") as ws:
        await ask(ws, op="subscribe", id="s", topics=["notes.#"])
        await ws.send(
            json.dumps({"op": "publish", "id": "p1", "topic": "notes.mine", "payload": 7})
        )
        accepted = await about(ws, "p1")
        assert accepted["type"] == "accepted"
        # The bridge receives the relayed copy (its stream binds notes.#): delivered.
        delivered = await about(ws, "p1")
        assert delivered == {
            "type": "delivered", "id": "p1", "message_id": accepted["message_id"]
        }
        note = await live.service.seen.get()
        assert (note.message_id, note.headers["x-mesh-on-behalf-of"]) == (
            accepted["message_id"],
            "viewer",
        )

        await ws.send(json.dumps({"op": "request", "id": "r1", "agent": "svc",
                                  "operation": "echo", "payload": {"x": 1}}))
        assert (await about(ws, "r1"))["type"] == "accepted"
        completed = await about(ws, "r1")
        assert (completed["type"], completed["result"]) == ("completed", {"x": 1})

        await ws.send(json.dumps({"op": "request", "id": "r2", "agent": "svc",
                                  "operation": "fail"}))
        assert (await about(ws, "r2"))["type"] == "accepted"
        failed = await about(ws, "r2")
        assert (failed["type"], failed["status"], failed["error_type"]) == (
            "failed", 502, "ValueError"
        )

        await ws.send(json.dumps({"op": "request", "id": "r3", "agent": "svc",
                                  "operation": "slow", "timeout": 0.3}))
        assert (await about(ws, "r3"))["type"] == "accepted"
        late = await about(ws, "r3")
        assert (late["type"], late["timeout"]) == ("timeout", 0.3)
        assert "deadline" in late

        refused = await ask(ws, op="request", id="r4", agent="svc", operation="echo",
                            timeout=1e6)
        assert (refused["type"], refused["status"]) == ("error", 400)
        schema = await ask(ws, op="publish", id="p2", topic="readings.a", payload={"value": "x"},
                           schema="reading@1")
        assert (schema["type"], schema["status"]) == ("error", 422)
        policy = await ask(ws, op="publish", id="p3", topic="elsewhere", payload=1)
        assert (policy["type"], policy["status"]) == ("error", 403)
        await ws.send("not json")
        assert (await about(ws, None))["status"] == 400
        unknown = await ask(ws, op="dance", id="d1")
        assert (unknown["type"], unknown["status"]) == ("error", 400)
        assert "op" in unknown["error"]


async def test_a_publish_the_gateway_refuses_is_reported_failed(mesh: Mesh) -> None:
    lax = POLICY.replace("who: [viewer, operator, service], topics", "who: [viewer, operator, "
                         "service, outsider], topics")
    assert lax != POLICY
    bridge_policy = parse_policy(lax)
    async with (
        running_bridge(mesh, serve=True, bridge_policy=bridge_policy) as live,
        client(live, "outsider") as ws,
    ):
        await ws.send(json.dumps({"op": "publish", "id": "p", "topic": "notes.x"}))
        accepted = await about(ws, "p")
        failed = await about(ws, "p")
    assert accepted["type"] == "accepted"
    assert failed["type"] == "failed"
    assert (failed["status"], failed["error_type"], failed["stage"]) == (403, "Denied", "authorize")
    assert failed["error"] == "publish 'notes.x': denied: no rule: denied by default"
    assert failed["message_id"] == accepted["message_id"]


async def test_registry_events_reach_those_who_may_see_the_agent(mesh: Mesh) -> None:
    async with (
        running_bridge(mesh, serve=True) as live,
        client(live, "viewer") as viewer,
        client(live, "outsider") as outsider,
    ):
        for ws in (viewer, outsider):
            answer = await ask(ws, op="subscribe", id="a", agents=True)
            assert answer["agents"] is True
        stop = await live.client.post(
            "/agents/svc/behaviours/notes/stop", headers=live.auth("operator")
        )
        assert stop.status_code == 200
        event = await frame(viewer)
        assert (event["type"], event["event"], event["agent"]) == ("agent", "behaviour", "svc")
        assert {b["name"]: b["state"] for b in event["record"]["behaviours"]}["notes"] == (
            "stopped"
        )
        # The outsider may not see svc: the event was fanned out to both clients at once,
        # so the answer to a later frame is the first thing the outsider receives.
        await outsider.send(json.dumps({"op": "publish", "id": "probe", "topic": "x"}))
        probe = await frame(outsider)
        assert (probe["type"], probe["id"]) == ("error", "probe")


async def test_a_slow_client_is_closed_and_the_others_get_everything(mesh: Mesh) -> None:
    config = replace(CONFIG, send_buffer=8)
    payload = {"blob": "x" * 100_000}
    async with (
        running_bridge(mesh, serve=True, config=config) as live,
        client(live, "viewer", max_queue=1) as slow,
        client(live, "viewer") as fast,
    ):
        for ws in (slow, fast):
            await ask(ws, op="subscribe", id="s", topics=["notes.#"])
        received = []

        async def read_fast() -> None:
            while True:
                received.append((await frame(fast))["type"])

        reader = asyncio.create_task(read_fast())
        sent = 0
        # The slow client reads nothing: the bridge's buffer for it fills once the socket's
        # buffers are full, however large the kernel makes them.
        while live.bridge.stream.dropped_slow == 0:
            assert sent < 2000, "the slow client was never closed"
            for _ in range(20):
                await live.service.publish("notes.bulk", payload)
            sent += 20
        await eventually(lambda: len(received) >= sent or reader.done())
        reader.cancel()
        assert received == ["message"] * sent
        assert live.bridge.stream.dropped_slow == 1
        assert await closed_with(slow) == SLOW_CLIENT
        assert len(live.bridge.stream.subscribers) == 1


async def test_the_stream_as_server_sent_events(mesh: Mesh) -> None:
    async with running_bridge(mesh, serve=True) as live:
        base = f"http://{live.url}"
        async with httpx.AsyncClient(base_url=base, timeout=15) as http:
            denied = await http.get("/stream?topics=readings.%23", headers=live.auth("viewer"))
            assert denied.status_code == 403
            nothing = await http.get("/stream", headers=live.auth("viewer"))
            assert nothing.status_code == 400
            token = live.mesh.token("operator")
            assert (await http.get("/stream?topics=notes.%23")).status_code == 401
            lax = await http.get(f"/stream?topics=notes.%23&access_token={token}")
            assert lax.status_code == 403  # operator may not subscribe at all
            async with http.stream(
                "GET", "/stream?topics=notes.%23,readings.r1", headers=live.auth("viewer")
            ) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.aiter_lines()
                assert await anext(lines) == "event: welcome"
                await eventually(lambda: "notes.#" in live.bridge.stream.bound)
                await live.service.publish("notes.sse", {"via": "sse"})
                events = []
                async for line in lines:
                    if line.startswith("event: message"):
                        events.append(json.loads((await anext(lines)).removeprefix("data: ")))
                        break
        assert (events[0]["topic"], events[0]["payload"]) == ("notes.sse", {"via": "sse"})
        await eventually(lambda: live.bridge.stream.bound == [])


async def test_a_binding_the_broker_refuses_is_403_and_the_stream_goes_on(mesh: Mesh) -> None:
    """The bridge's policy lets the viewer watch ``other.#``, but the bridge's broker user was
    provisioned from the mesh's policy, which does not: the broker refuses the binding."""
    lax = POLICY.replace('topics: ["notes.#", "readings.#"]}', 'topics: ["notes.#", "other.#"]}')
    assert lax != POLICY
    bridge_policy = parse_policy(lax)
    async with (
        running_bridge(mesh, serve=True, bridge_policy=bridge_policy) as live,
        client(live, "viewer") as ws,
    ):
        refused = await ask(ws, op="subscribe", id="s1", topics=["notes.#", "other.#"])
        assert (refused["type"], refused["status"]) == ("error", 403)
        assert "the broker refused to bind 'other.#'" in refused["error"]
        assert live.bridge.stream.bound == []
        ok = await ask(ws, op="subscribe", id="s2", topics=["notes.#"])
        assert ok["type"] == "subscribed"
        await live.service.publish("notes.after", {})
        got = await frame(ws)
        assert (got["type"], got["topic"]) == ("message", "notes.after")
