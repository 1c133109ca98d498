"""The bridge's REST API on a provisioned mesh: tokens, the policy and schemas checked before
sending, publishing and calling on the caller's behalf, control, the registry as a caller
may see it, and bad input answered with a JSON 4xx."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from bridge_support import (  # noqa: F401 (mesh_fixture)
    POLICY,
    Mesh,
    Service,
    mesh_fixture,
    running_bridge,
)
from click.testing import CliRunner
from helpers import eventually, running, take

from mesh import Settings
from mesh.bridge import Bridge, BridgeConfig, BridgeError, create_app
from mesh.cli import main
from mesh.envelope import H_ON_BEHALF_OF
from mesh.gateway import Gateway
from mesh.policy import TokenStore, broker_user, parse_policy


async def test_callers_need_a_valid_token(mesh: Mesh) -> None:
    async with running_bridge(mesh) as live:
        client = live.client
        assert (await client.get("/health")).json()["mode"] == "policy"
        assert (await client.get("/ready")).json() == {"ready": True, "broker": "ok", "redis": "ok"}

        missing = await client.get("/agents")
        assert missing.status_code == 401
        assert missing.json()["type"] == "Unauthorized"
        assert "mesh token issue" in missing.json()["error"]
        assert missing.headers["www-authenticate"].startswith("Bearer")

        bad = await client.get("/agents", headers={"Authorization": "Bearer mesh_guessed"})
        assert bad.status_code == 401
        assert 'error="invalid_token"' in bad.headers["www-authenticate"]
        scheme = await client.get("/agents", headers={"Authorization": "Basic dXNlcjpwdw=="})
        assert scheme.status_code == 401

        headers = live.auth("viewer")
        assert (await client.get("/agents", headers=headers)).status_code == 200
        live.mesh.revoke("viewer")
        revoked = await client.post("/topics/notes.a", json={}, headers=headers)
        assert revoked.status_code == 401
        assert revoked.json()["error"] == "the token is unknown or revoked"


async def test_a_publish_reaches_subscribers_sent_on_the_callers_behalf(mesh: Mesh) -> None:
    async with running_bridge(mesh) as live:
        answer = await live.client.post(
            "/topics/notes.today", json={"text": "hi"}, headers=live.auth("viewer")
        )
        assert answer.status_code == 202, answer.text
        assert answer.json()["topic"] == "notes.today"
        [seen] = await take(live.service.seen, 1)
    assert seen.message_id == answer.json()["message_id"]
    assert seen.payload == {"text": "hi"}
    # The broker verified the bridge's user; the gateway authorized the caller it named.
    assert seen.user_id == broker_user(mesh.settings.namespace, "bridge")
    assert seen.app_id == "bridge"
    assert seen.headers[H_ON_BEHALF_OF] == "viewer"


async def test_what_the_policy_denies_is_403_with_the_reason(mesh: Mesh) -> None:
    async with running_bridge(mesh) as live:
        outsider = await live.client.post(
            "/topics/notes.today", json={}, headers=live.auth("outsider")
        )
        assert outsider.status_code == 403
        body = outsider.json()
        assert body["type"] == "Forbidden"
        assert body["error"] == "publish 'notes.today': denied: no rule: denied by default"
        assert body["principal"] == "outsider"

        viewer = await live.client.post(
            "/agents/svc/shutdown", headers=live.auth("viewer")
        )
        assert viewer.status_code == 403
        assert viewer.json()["error"].startswith("control '_ctl.svc.shutdown': denied")
        assert not live.service.should_stop
        assert live.service.seen.empty()


async def test_the_gateway_refusal_comes_back_as_403(mesh: Mesh, tmp_path: Path) -> None:
    """A bridge whose policy lets more through than the gateway's: the gateway refuses for
    the caller, and its reason reaches the caller."""
    lax = POLICY.replace(
        "{allow: request, who: [viewer, operator],",
        "{allow: request, who: [viewer, operator, outsider],",
    )
    assert lax != POLICY
    async with running_bridge(mesh, bridge_policy=parse_policy(lax)) as live:
        answer = await live.client.post(
            "/agents/svc/rpc/echo", json={"a": 1}, headers=live.auth("outsider")
        )
    assert answer.status_code == 403
    body = answer.json()
    assert (body["remote_type"], body["stage"]) == ("Denied", "gateway")
    assert body["error"] == "request '_req.svc.echo': denied: no rule: denied by default"


async def test_a_payload_its_schema_refuses_is_422_and_not_sent(mesh: Mesh) -> None:
    async with running_bridge(mesh) as live:
        headers = live.auth("viewer")
        wrong = await live.client.post(
            "/topics/readings.r1?schema=reading@1", json={"value": "fast"}, headers=headers
        )
        assert wrong.status_code == 422
        assert wrong.json()["type"] == "SchemaViolation"
        assert wrong.json()["error"] == (
            "payload.value: a string is not of type 'number' (reading@1)"
        )
        unnamed = await live.client.post("/topics/readings.r1", json={"value": 1}, headers=headers)
        assert unnamed.status_code == 422
        assert "names no schema" in unnamed.json()["error"]
        right = await live.client.post(
            "/topics/readings.r1?schema=reading@1", json={"value": 1}, headers=headers
        )
        assert right.status_code == 202


async def test_rpc_answers_the_reply_or_the_failure(mesh: Mesh) -> None:
    async with running_bridge(mesh) as live:
        client, headers = live.client, live.auth("viewer")
        echo = await client.post("/agents/svc/rpc/echo", json={"n": [1, 2]}, headers=headers)
        assert (echo.status_code, echo.json()) == (200, {"n": [1, 2]})

        failed = await client.post("/agents/svc/rpc/fail", headers=headers)
        assert failed.status_code == 502
        assert failed.json()["remote_type"] == "ValueError"
        assert failed.json()["error"] == "the handler failed on purpose"

        before = datetime.now().astimezone()
        late = await client.post("/agents/svc/rpc/slow?timeout=0.3", headers=headers)
        assert late.status_code == 504
        body = late.json()
        assert (body["type"], body["timeout"]) == ("Timeout", 0.3)
        assert datetime.fromisoformat(body["deadline"]) > before

        nobody = await client.post("/agents/svc9/rpc/echo", headers=headers)
        assert nobody.status_code == 404
        assert nobody.json()["remote_type"] == "NoLiveInstance"
        unserved = await client.post("/agents/svc/rpc/nothing", headers=headers)
        assert unserved.status_code == 404
        assert unserved.json()["remote_type"] == "Unroutable"


async def test_operators_stop_and_start_behaviours_and_shut_agents_down(mesh: Mesh) -> None:
    async with running_bridge(mesh) as live:
        client, headers = live.client, live.auth("operator")
        stopped = await client.post("/agents/svc/behaviours/notes/stop", headers=headers)
        assert stopped.status_code == 200, stopped.text
        [answer] = stopped.json()["instances"]
        assert (answer["instance"], answer["result"]["state"]) == (live.service.instance, "stopped")

        async def notes_stopped() -> bool:
            shown = await client.get("/agents/svc", headers=headers)
            [instance] = shown.json()["instances"]
            return any(
                (b["name"], b["state"]) == ("notes", "stopped") for b in instance["behaviours"]
            )

        await eventually(notes_stopped)
        started = await client.post("/agents/svc/behaviours/notes/start", headers=headers)
        assert started.json()["instances"][0]["result"]["state"] == "running"

        unknown = await client.post("/agents/svc/behaviours/nothing/stop", headers=headers)
        assert unknown.status_code == 404
        assert "has no behaviour 'nothing'" in unknown.json()["error"]
        verb = await client.post("/agents/svc/behaviours/notes/pause", headers=headers)
        assert verb.status_code == 404

        down = await client.post("/agents/svc/shutdown", headers=headers)
        assert down.status_code == 200
        assert down.json()["instances"][0]["result"]["shutting_down"] is True
        await eventually(lambda: live.service.should_stop)


async def test_callers_see_the_agents_the_policy_lets_them_reach(mesh: Mesh) -> None:
    async with running_bridge(mesh) as live:
        client = live.client
        viewer, outsider = live.auth("viewer"), live.auth("outsider")
        listed = await client.get("/agents", headers=viewer)
        assert [a["agent"] for a in listed.json()["agents"]] == ["svc"]
        [instance] = listed.json()["agents"][0]["instances"]
        assert {b["name"] for b in instance["behaviours"]} == {"notes", "rpc"}
        assert (await client.get("/agents", headers=outsider)).json() == {"agents": []}
        assert (await client.get("/agents/svc", headers=outsider)).status_code == 404
        assert (await client.get("/agents/bridge", headers=viewer)).status_code == 404
        filtered = await client.get("/agents?topic=notes.x", headers=viewer)
        assert [a["agent"] for a in filtered.json()["agents"]] == ["svc"]


async def test_bad_input_is_a_json_4xx_naming_the_problem(mesh: Mesh) -> None:
    async with running_bridge(mesh) as live:
        client, headers = live.client, live.auth("viewer")

        async def refused(method: str, url: str, status: int, needle: str, **kw: object) -> None:
            answer = await client.request(method, url, headers=headers, **kw)  # type: ignore[arg-type]
            assert answer.status_code == status, (url, answer.text)
            assert answer.headers["content-type"] == "application/json"
            assert needle in answer.json()["error"], answer.json()

        await refused("POST", "/topics/notes.a", 400, "the body is not JSON", content=b"{nope")
        await refused("POST", "/topics/notes.a", 400, "not JSON", content=b"[NaN]")
        big = b'"' + b"x" * live.bridge.config.max_body + b'"'
        await refused("POST", "/topics/notes.a", 413, "larger than", content=big)
        await refused("POST", "/topics/notes.*", 400, "wildcards are for subscriptions")
        await refused("POST", "/topics/_req.svc.echo", 400, "must not be empty or start with '_'")
        await refused("POST", "/topics/notes..a", 400, "word ''")
        await refused("POST", "/agents/svc!/rpc/echo", 400, "invalid agent id 'svc!'")
        await refused("POST", "/agents/svc/rpc/echo?timeout=soon", 400, "must be a number")
        await refused("POST", "/agents/svc/rpc/echo?timeout=0", 400, "more than 0")
        await refused("POST", "/agents/svc/rpc/echo?timeout=1e9", 400, "at most 60")
        await refused("GET", "/agents?alive=maybe", 400, "true or false")
        await refused("GET", "/agents?topic=notes.%23", 400, "wildcards")
        await refused("GET", "/nowhere", 404, "no such resource")
        await refused("DELETE", "/topics/notes.a", 405, "DELETE is not allowed")
        # A body of the wrong JSON type for the schema: 422, as any schema refusal.
        await refused("POST", "/topics/readings.a?schema=reading@1", 422, "not of type", json=[1])


async def test_the_openapi_document_and_the_docs_page(mesh: Mesh) -> None:
    async with running_bridge(mesh) as live:
        document = (await live.client.get("/openapi.json")).json()
        page = await live.client.get("/docs")
        index = await live.client.get("/")
    assert document["openapi"] == "3.1.0"
    assert {"/topics/{topic}", "/agents/{agent}/rpc/{operation}", "/stream"} <= set(
        document["paths"]
    )
    publish = document["paths"]["/topics/{topic}"]["post"]
    assert {"202", "401", "403", "422"} <= set(publish["responses"])
    assert "Accepted" in document["components"]["schemas"]
    assert page.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in page.text and "<script" in page.text and "https://" not in page.text
    assert index.status_code == 200 and "/docs" in index.text


def test_the_bridge_refuses_to_start_without_a_policy() -> None:
    result = CliRunner().invoke(main, ["bridge"], env={"MESH_POLICY": ""})
    assert result.exit_code == 1
    assert "no policy (MESH_POLICY)" in result.output
    assert "--insecure-open" in result.output


async def test_requests_run_concurrently_for_several_callers(mesh: Mesh) -> None:
    async with running_bridge(mesh) as live:
        viewer, operator = live.auth("viewer"), live.auth("operator")
        answers = await asyncio.gather(
            *(
                live.client.post(
                    "/agents/svc/rpc/echo", json=i, headers=viewer if i % 2 else operator
                )
                for i in range(20)
            )
        )
    assert [a.json() for a in answers] == list(range(20))


async def test_the_audit_trail_shows_what_the_caller_may_see(mesh: Mesh) -> None:
    """The viewer sees its own publish and the service's note (it may subscribe to notes.#),
    not the operator's request; the operator sees its request, not the notes."""
    async with running_bridge(mesh) as live:
        client, viewer, operator = live.client, live.auth("viewer"), live.auth("operator")
        mine = await client.post("/topics/notes.mine", json={}, headers=viewer)
        theirs = await live.service.publish("notes.theirs", {})
        assert (await client.post("/agents/svc/rpc/echo", json=1, headers=operator)).json() == 1

        async def records(headers: dict[str, str], query: str = "") -> list[dict[str, Any]]:
            answer = await client.get(f"/audit{query}", headers=headers)
            assert answer.status_code == 200, answer.text
            return [entry["record"] for entry in answer.json()["records"]]

        async def viewer_sees_both() -> bool:
            ids = {r["message_id"] for r in await records(viewer)}
            return {mine.json()["message_id"], theirs} <= ids

        await eventually(viewer_sees_both)
        seen = await records(viewer)
        assert {r["topic"] for r in seen} == {"notes.mine", "notes.theirs"}
        own = next(r for r in seen if r["topic"] == "notes.mine")
        assert (own["principal"], own["delegated_by"], own["decision"]) == (
            "viewer", "bridge", "allowed"
        )
        assert {r["topic"] for r in await records(operator)} == {"_req.svc.echo"}
        only = await records(viewer, "?topic=notes.%23&principal=service&limit=1")
        assert [r["topic"] for r in only] == ["notes.theirs"]
        bad = await client.get("/audit?decision=maybe", headers=viewer)
        assert bad.status_code == 400 and "decision must be one of" in bad.json()["error"]
        assert (await client.get("/audit?since=yesterday", headers=viewer)).status_code == 400
        assert (await client.get("/audit")).status_code == 401


async def test_open_mode_serves_anyone_without_tokens(settings: Settings) -> None:
    """No policy, and --insecure-open: no token asked, nothing sent on anyone's behalf."""
    service = Service("svc", settings=settings)
    bridge = Bridge(settings, BridgeConfig(insecure_open=True))
    async with running(Gateway(settings=settings), service), bridge:
        transport = httpx.ASGITransport(app=create_app(bridge))
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as client:
            assert (await client.get("/health")).json()["mode"] == "open"
            answer = await client.post("/topics/notes.open", json={"n": 1})
            assert answer.status_code == 202
            [seen] = await take(service.seen, 1)
            assert (await client.post("/agents/svc/rpc/echo", json=2)).json() == 2
    assert seen.message_id == answer.json()["message_id"]
    assert H_ON_BEHALF_OF not in seen.headers


def test_the_bridge_needs_a_delegating_principal_or_insecure_open() -> None:
    settings = Settings()
    with pytest.raises(BridgeError, match="--insecure-open"):
        Bridge(settings)
    policy = parse_policy(POLICY.replace("bridge: {kind: bridge}", "bridge: {kind: agent}"))
    with pytest.raises(BridgeError, match="does not delegate"):
        Bridge(settings, policy=policy, tokens=TokenStore("unused", []))
    with pytest.raises(BridgeError, match="'relay' is no principal"):
        Bridge(settings, BridgeConfig(agent_id="relay"), parse_policy(POLICY), tokens=None)
