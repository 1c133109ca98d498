"""A2A on the bridge, driven by the A2A SDK's own client against bridges served by uvicorn
on a provisioned mesh: the agent card, SendMessage, SendStreamingMessage, GetTask from
another replica, CancelTask, denials, the 0.3 method names, and the bridge without the
extra."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from a2a.client import (
    A2ACardResolver,
    AuthInterceptor,
    Client,
    ClientCallContext,
    ClientConfig,
    ClientFactory,
    CredentialService,
)
from a2a.helpers import get_data_parts, get_message_text, new_data_message, new_text_part
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskNotCancelableError,
    TaskNotFoundError,
    TaskState,
)
from bridge_support import POLICY, Mesh, Service, delete_users, provisioned, served
from google.protobuf.json_format import MessageToDict
from helpers import eventually, free_port, running, take

from mesh import Message as MeshMessage
from mesh import Settings, rpc
from mesh.bridge import Bridge, BridgeConfig, create_app
from mesh.envelope import H_ON_BEHALF_OF
from mesh.gateway import Gateway
from mesh.policy import Policy, TokenStore, parse_policy

A2A_POLICY = (
    POLICY.replace(
        "  outsider: {kind: user}\n", "  outsider: {kind: user}\n  echoer: {kind: user}\n"
    )
    .replace(
        "      - {allow: reply,",
        '      - {allow: request, who: echoer, request: {agent: svc, operation: echo}}\n'
        "      - {allow: reply,",
    )
    .replace(
        "  definitions:\n",
        "  definitions:\n"
        "    sum:\n"
        "      - version: 1\n"
        "        inline:\n"
        "          type: object\n"
        "          properties: {a: {type: integer}, b: {type: integer}}\n"
        "          required: [a, b]\n",
    )
    .replace(
        "  payloads:\n",
        "  payloads:\n    - {request: {agent: svc, operation: add}, accept: [sum@1]}\n",
    )
)
"""The bridge tests' policy, with ``echoer`` (may call ``svc``'s ``echo`` only) and a schema
for ``svc``'s ``add``."""

SUBMITTED, WORKING = TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING
COMPLETED, FAILED = TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED
REJECTED, CANCELED = TaskState.TASK_STATE_REJECTED, TaskState.TASK_STATE_CANCELED


class Calc(Service):
    """``svc``: the bridge tests' service (``echo``, ``fail``, ``slow``) with ``add``."""

    @rpc("add")
    async def add(self, msg: MeshMessage, payload: dict[str, Any]) -> int:
        self.seen.put_nowait(msg)
        return int(payload["a"] + payload["b"])


@pytest.fixture(name="mesh")
async def mesh_fixture(settings: Settings, tmp_path: Path) -> AsyncIterator[Mesh]:
    try:
        yield await provisioned(settings, tmp_path, A2A_POLICY)
    finally:
        await delete_users(settings)


@dataclass
class Live:
    mesh: Mesh
    calc: Calc
    urls: list[str]
    """Where each bridge replica serves (``http://127.0.0.1:<port>``)."""
    replicas: list[AsyncExitStack]

    async def stop(self, replica: int) -> None:
        """Stop serving replica ``replica`` (its app's lifespan stops the bridge)."""
        await self.replicas[replica].aclose()


@asynccontextmanager
async def a2a_mesh(
    mesh: Mesh, *, replicas: int = 1, bridge_policy: Policy | None = None
) -> AsyncIterator[Live]:
    """The gateway, ``svc`` and ``replicas`` bridges (one agent id, as replicas are), each
    served on a port of its own and sharing the mesh's Redis."""
    calc = Calc("svc", settings=mesh.under("service"))
    async with AsyncExitStack() as stack:
        gateway = Gateway(settings=mesh.under("gateway"))
        await stack.enter_async_context(running(gateway, calc))
        live = Live(mesh, calc, [], [])
        for _ in range(replicas):
            bridge = Bridge(
                mesh.under("bridge"),
                BridgeConfig(port=free_port()),
                bridge_policy or mesh.policy,
                tokens=TokenStore.for_policy(mesh.policy),
            )
            replica = await stack.enter_async_context(AsyncExitStack())
            address = await replica.enter_async_context(served(bridge))
            live.urls.append(f"http://{address}")
            live.replicas.append(replica)
        stack.callback(calc.release.set)  # first thing on the way out: no handler waits
        yield live


class Token(CredentialService):
    """Hands the SDK's ``AuthInterceptor`` a bearer token for the card's ``bearer`` scheme."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get_credentials(self, scheme: str, context: ClientCallContext | None) -> str | None:
        return self.token if scheme == "bearer" else None


async def card_of(url: str, token: str, agent: str = "svc") -> AgentCard:
    """``agent``'s card from the bridge at ``url``, read by the SDK's resolver."""
    async with httpx.AsyncClient() as http:
        return await A2ACardResolver(http, f"{url}/a2a/{agent}").get_agent_card(
            http_kwargs={"headers": {"Authorization": f"Bearer {token}"}}
        )


@asynccontextmanager
async def a2a_client(
    url: str,
    token: str,
    *,
    agent: str = "svc",
    streaming: bool = False,
    polling: bool = False,
    card: AgentCard | None = None,
) -> AsyncIterator[Client]:
    """The SDK's client of ``agent`` at the bridge ``url``: it reads the agent card (with the
    token), and the card's security scheme makes its ``AuthInterceptor`` send the token."""
    card = card or await card_of(url, token, agent)
    async with httpx.AsyncClient(timeout=30) as http:
        config = ClientConfig(httpx_client=http, streaming=streaming, polling=polling)
        client = ClientFactory(config).create(card, interceptors=[AuthInterceptor(Token(token))])
        async with client:
            yield client


def ask(operation: str, payload: Any, **metadata: Any) -> SendMessageRequest:
    message = new_data_message(payload, role=Role.ROLE_USER)
    message.metadata.update({"operation": operation, **metadata})
    return SendMessageRequest(message=message)


async def send(client: Client, request: SendMessageRequest) -> list[StreamResponse]:
    return [event async for event in client.send_message(request)]


async def one_task(client: Client, request: SendMessageRequest) -> Task:
    [event] = await send(client, request)
    assert event.HasField("task"), event
    return event.task


def result(task: Task) -> Any:
    [artifact] = task.artifacts
    assert artifact.name == "result"
    [data] = get_data_parts(artifact.parts)
    return data


def why(task: Task) -> str:
    return get_message_text(task.status.message)


async def has_state(client: Client, task_id: str, state: int) -> bool:
    return (await client.get_task(GetTaskRequest(id=task_id))).status.state == state


def running_here(task_id: str) -> bool:
    """Whether this process (where the bridges run) still runs ``task_id``: the SDK's task
    that applies its events (named ``consumer:<id>``) has not ended."""
    return any(task.get_name() == f"consumer:{task_id}" for task in asyncio.all_tasks())


def states(events: list[StreamResponse]) -> list[int]:
    """The task states a stream went through, in order."""
    seen = []
    for event in events:
        if event.HasField("task"):
            seen.append(event.task.status.state)
        elif event.HasField("status_update"):
            seen.append(event.status_update.status.state)
    return seen


async def test_the_card_lists_the_operations_the_caller_may_call(mesh: Mesh) -> None:
    async with a2a_mesh(mesh) as live, httpx.AsyncClient() as http:
        [url] = live.urls
        viewer = {"Authorization": f"Bearer {mesh.token('viewer')}"}
        card = await card_of(url, mesh.token("viewer"))
        assert card.name == "svc"
        interfaces = {
            (i.url, i.protocol_binding, i.protocol_version) for i in card.supported_interfaces
        }
        assert interfaces == {
            (f"{url}/a2a/svc", "JSONRPC", "1.0"),
            (f"{url}/a2a/svc", "JSONRPC", "0.3"),
        }
        assert card.capabilities.streaming
        assert list(card.default_input_modes) == list(card.default_output_modes) == [
            "application/json"
        ]
        assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "bearer"
        assert "bearer" in card.security_requirements[0].schemes
        skills = {skill.id: skill for skill in card.skills}
        assert set(skills) == {"add", "echo", "fail", "slow"}
        schema = {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        }
        assert "sum@1" in skills["add"].description
        assert '"required":["a","b"]' in skills["add"].description
        [extension] = card.capabilities.extensions
        params = MessageToDict(extension.params)
        assert params["operations"]["add"]["schemas"]["sum@1"] == schema
        assert params["operations"]["echo"]["schemas"] == {}

        # Skills are the operations the caller may request; agents it may not reach are not
        # found; a card needs a token.
        echoer = {"Authorization": f"Bearer {mesh.token('echoer')}"}
        narrow = await http.get(f"{url}/a2a/svc/.well-known/agent-card.json", headers=echoer)
        assert [skill["id"] for skill in narrow.json()["skills"]] == ["echo"]
        outsider = {"Authorization": f"Bearer {mesh.token('outsider')}"}
        hidden = await http.get(f"{url}/a2a/svc/.well-known/agent-card.json", headers=outsider)
        assert hidden.status_code == 404
        nobody = await http.get(f"{url}/a2a/svc9/.well-known/agent-card.json", headers=viewer)
        assert nobody.status_code == 404
        anonymous = await http.get(f"{url}/a2a/svc/.well-known/agent-card.json")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        unsent = await http.post(f"{url}/a2a/svc", json={"jsonrpc": "2.0", "id": 1})
        assert unsent.status_code == 401


async def test_a_message_becomes_a_request_on_the_callers_behalf(
    mesh: Mesh, redis: aioredis.Redis
) -> None:
    async with a2a_mesh(mesh) as live, a2a_client(live.urls[0], mesh.token("viewer")) as client:
        task = await one_task(client, ask("add", {"a": 2, "b": 3}, schema="sum@1"))
        assert task.status.state == COMPLETED, why(task)
        assert result(task) == 5
        [request] = await take(live.calc.seen, 1)
        # The handler got whole numbers back as integers, sent by the bridge for the caller.
        assert request.payload == {"a": 2, "b": 3}
        assert all(type(n) is int for n in request.payload.values())
        assert request.headers[H_ON_BEHALF_OF] == "viewer"
        assert task.metadata["message_id"] == request.message_id
        assert task.history[0].role == Role.ROLE_USER
        ttl = await redis.pttl(f"{mesh.settings.namespace}:a2a:tasks:{task.id}")
        assert 0 < ttl <= 3_600_000

        echoed = await one_task(client, ask("echo", {"text": "hi", "n": [1, 2.5], "x": None}))
        assert result(echoed) == {"text": "hi", "n": [1, 2.5], "x": None}

        failed = await one_task(client, ask("fail", {}))
        assert failed.status.state == FAILED
        assert why(failed) == "the handler failed on purpose"
        late = await one_task(client, ask("slow", {}, timeout=0.3))
        assert late.status.state == FAILED
        assert why(late).startswith("no reply from svc.slow within 0.3s")


async def test_streaming_reports_each_state(mesh: Mesh) -> None:
    token = mesh.token("viewer")
    async with a2a_mesh(mesh) as live, a2a_client(live.urls[0], token, streaming=True) as client:
        events = await send(client, ask("add", {"a": 1, "b": 1}, schema="sum@1"))
        assert states(events) == [SUBMITTED, WORKING, COMPLETED]
        [artifact] = [e.artifact_update.artifact for e in events if e.HasField("artifact_update")]
        assert get_data_parts(artifact.parts) == [2]

        failing = await send(client, ask("fail", {}))
        assert states(failing) == [SUBMITTED, WORKING, FAILED]
        last = failing[-1].status_update.status
        assert get_message_text(last.message) == "the handler failed on purpose"
        detail = MessageToDict(failing[-1].status_update.metadata)
        assert (detail["status"], detail["remote_type"]) == (502, "ValueError")


async def test_any_replica_answers_for_a_task(mesh: Mesh) -> None:
    viewer = mesh.token("viewer")
    async with (
        a2a_mesh(mesh, replicas=2) as live,
        a2a_client(live.urls[0], viewer, polling=True) as first,
        a2a_client(live.urls[1], viewer, streaming=True) as second,
        a2a_client(live.urls[1], mesh.token("operator")) as stranger,
    ):
        started = await one_task(first, ask("slow", {}))
        assert started.status.state == SUBMITTED
        await eventually(lambda: has_state(second, started.id, WORKING))
        with pytest.raises(TaskNotFoundError):  # another principal's task
            await stranger.get_task(GetTaskRequest(id=started.id))

        # The other replica also streams what becomes of it (from the events in Redis).
        events = second.subscribe(SubscribeToTaskRequest(id=started.id))
        snapshot = await anext(events)
        assert snapshot.task.status.state == WORKING
        live.calc.release.set()
        rest = [event async for event in events]
        assert states(rest) == [COMPLETED]
        [artifact] = [e.artifact_update.artifact for e in rest if e.HasField("artifact_update")]
        assert get_data_parts(artifact.parts) == ["late"]
        done = await second.get_task(GetTaskRequest(id=started.id))
        assert (done.status.state, result(done)) == (COMPLETED, "late")


async def test_a_replica_that_stops_fails_the_tasks_it_runs(mesh: Mesh) -> None:
    viewer = mesh.token("viewer")
    async with a2a_mesh(mesh, replicas=2) as live, a2a_client(live.urls[1], viewer) as second:
        async with a2a_client(live.urls[0], viewer, polling=True) as first:
            started = await one_task(first, ask("slow", {}))
        await eventually(lambda: has_state(second, started.id, WORKING))
        await live.stop(0)
        orphan = await second.get_task(GetTaskRequest(id=started.id))
    assert orphan.status.state == FAILED
    assert why(orphan) == "the bridge replica running the task stopped before the reply came"


async def test_cancel_ends_the_task_canceled(mesh: Mesh) -> None:
    viewer = mesh.token("viewer")
    async with (
        a2a_mesh(mesh, replicas=2) as live,
        a2a_client(live.urls[0], viewer, streaming=True) as streaming,
        a2a_client(live.urls[0], viewer, polling=True) as first,
        a2a_client(live.urls[1], viewer) as second,
    ):
        # A stream sees its task canceled (here, by a call to the replica running it).
        events: list[StreamResponse] = []
        async for event in streaming.send_message(ask("slow", {})):
            events.append(event)
            if states(events)[-1:] == [WORKING]:
                canceled = await first.cancel_task(CancelTaskRequest(id=events[0].task.id))
                assert canceled.status.state == CANCELED
        assert states(events) == [SUBMITTED, WORKING, CANCELED]
        assert "stopped waiting" in get_message_text(events[-1].status_update.status.message)

        # A task canceled through another replica: its record says so everywhere.
        started = await one_task(first, ask("slow", {}))
        await eventually(lambda: has_state(second, started.id, WORKING))
        canceled = await second.cancel_task(CancelTaskRequest(id=started.id))
        assert canceled.status.state == CANCELED
        assert (await first.get_task(GetTaskRequest(id=started.id))).status.state == CANCELED
        with pytest.raises(TaskNotCancelableError):  # over: nothing left to cancel
            await first.cancel_task(CancelTaskRequest(id=started.id))
        # The replica running it gets the reply, finds the task over, and leaves it so.
        assert running_here(started.id)
        live.calc.release.set()
        await eventually(lambda: not running_here(started.id), what="the task stopped")
        assert (await second.get_task(GetTaskRequest(id=started.id))).status.state == CANCELED


async def test_what_is_refused_ends_rejected_with_the_reason(mesh: Mesh) -> None:
    # This bridge lets the outsider call echo; the gateway, enforcing the mesh's policy,
    # does not.
    lax = parse_policy(
        A2A_POLICY.replace(
            "{allow: request, who: echoer,", "{allow: request, who: [echoer, outsider],"
        )
    )
    async with a2a_mesh(mesh, bridge_policy=lax) as live:
        [url] = live.urls
        card = await card_of(url, mesh.token("viewer"))
        async with a2a_client(url, mesh.token("viewer"), card=card) as viewer:
            unnamed = await one_task(viewer, ask("add", {"a": 1, "b": 2}))
            assert unnamed.status.state == REJECTED
            assert "names no schema" in why(unnamed)
            wrong = await one_task(viewer, ask("add", {"a": "one", "b": 2}, schema="sum@1"))
            assert wrong.status.state == REJECTED
            assert why(wrong) == "payload.a: a string is not of type 'integer' (sum@1)"
            unserved = await one_task(viewer, ask("nothing", {}))
            assert unserved.status.state == REJECTED
            assert MessageToDict(unserved.metadata)["remote_type"] == "Unroutable"
            text = new_data_message({}, role=Role.ROLE_USER)
            text.parts.append(new_text_part("hello"))
            text.metadata.update({"operation": "echo"})
            mixed = await one_task(viewer, SendMessageRequest(message=text))
            assert mixed.status.state == REJECTED
            assert "exactly one data part (it has: data, text)" in why(mixed)
            bare = Message(role=Role.ROLE_USER, message_id="m1", parts=[new_text_part("x")])
            anonymous_op = await one_task(viewer, SendMessageRequest(message=bare))
            assert "names no operation" in why(anonymous_op)

        async with a2a_client(url, mesh.token("outsider"), card=card) as outsider:
            denied = await one_task(outsider, ask("echo", {"a": 1}))
            refused = await one_task(outsider, ask("add", {"a": 1, "b": 2}, schema="sum@1"))
        assert denied.status.state == REJECTED
        assert why(denied) == "request '_req.svc.echo': denied: no rule: denied by default"
        detail = MessageToDict(denied.metadata)
        assert (detail["stage"], detail["remote_type"], detail["status"]) == (
            "gateway",
            "Denied",
            403,
        )
        # The bridge's own check refuses before sending, in the gateway's words.
        assert refused.status.state == REJECTED
        assert why(refused) == "request '_req.svc.add': denied: no rule: denied by default"
        assert MessageToDict(refused.metadata)["stage"] == "authorize"
        assert live.calc.seen.empty()


async def test_clients_of_protocol_0_3_use_the_same_endpoint(mesh: Mesh) -> None:
    token = mesh.token("viewer")
    async with a2a_mesh(mesh) as live:
        card = await card_of(live.urls[0], token)
        legacy = [i for i in card.supported_interfaces if i.protocol_version == "0.3"]
        del card.supported_interfaces[:]
        card.supported_interfaces.extend(legacy)
        async with a2a_client(live.urls[0], token, card=card) as client:
            # The SDK's client for 0.3 agents, which sends the 0.3 method names.
            assert type(client._transport).__name__ == "CompatJsonRpcTransport"
            task = await one_task(client, ask("echo", {"v": 3}))
            assert (task.status.state, result(task)) == (COMPLETED, {"v": 3})
            again = await client.get_task(GetTaskRequest(id=task.id))
            assert again.status.state == COMPLETED


async def test_without_the_extra_a2a_answers_501(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "a2a", None)  # as if a2a-sdk were not installed
    bridge = Bridge(settings, BridgeConfig(insecure_open=True))
    app = create_app(bridge)
    assert "enable it with: pip install 'agentmesh[a2a]'" in caplog.text
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as client:
        for answer in (
            await client.get("/a2a/svc/.well-known/agent-card.json"),
            await client.post("/a2a/svc", json={"jsonrpc": "2.0", "id": 1}),
        ):
            assert answer.status_code == 501
            assert answer.json()["type"] == "NotImplemented"
            assert "pip install 'agentmesh[a2a]'" in answer.json()["error"]
        assert (await client.get("/health")).status_code == 200
