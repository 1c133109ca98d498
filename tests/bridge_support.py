"""Support for the bridge's tests: a mesh provisioned from ``POLICY`` (every principal under
the broker and Redis user ``mesh provision`` makes for it), its agents, and the bridge served
to httpx (REST, in the test's event loop) or by uvicorn on a free port (websockets, SSE).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from agents_reliability import Host, host
from helpers import eventually, free_port, running
from pydantic import SecretStr

from behaviours import SubscriberBehaviour
from mesh import Message, Settings, on, rpc
from mesh.bridge import Bridge, BridgeConfig, create_app
from mesh.bridge.server import server
from mesh.gateway import Gateway
from mesh.management import ManagementAPI, vhost_of
from mesh.policy import Policy, TokenStore, load_policy
from mesh.provision import CredentialStore, build_plan, mesh_objects, provision

POLICY = """\
principals:
  gateway: {kind: gateway}
  bridge: {kind: bridge}
  service: {kind: agent, agents: ["svc*"]}
  watcher: {kind: agent}
  viewer: {kind: user}
  operator: {kind: user}
  outsider: {kind: user}
rule_sets:
  main:
    rules:
      - {allow: publish, who: [viewer, operator, service], topics: "notes.#"}
      - {allow: publish, who: viewer, topics: "readings.*"}
      - {allow: subscribe, who: viewer, topics: ["notes.#", "readings.#"]}
      - {deny: subscribe, who: viewer, topics: "readings.secret.#"}
      - {allow: subscribe, who: [service, watcher], topics: "notes.#"}
      - {allow: request, who: [viewer, operator], request: {agent: "svc*", operation: "*"}}
      - {allow: reply, who: "*", reply: {agent: "*"}}
      - {allow: control, who: viewer, control: {agent: "svc*", command: ping}}
      - {allow: control, who: operator, control: {agent: "svc*", command: "*"}}
schemas:
  definitions:
    reading:
      - version: 1
        inline:
          type: object
          properties: {value: {type: number}}
          required: [value]
  payloads:
    - {topics: "readings.*", accept: [reading@1]}
"""
"""``viewer`` publishes notes and readings and watches notes and readings (but not
``readings.#``, which could deliver the denied ``readings.secret.#``); it calls ``svc*`` and
may ping it; ``operator`` also controls it; ``outsider`` may do nothing.  ``svc*`` agents are
the ``Service``; ``watcher`` is an agent nobody may see."""


class Notes(SubscriberBehaviour):
    """Puts every ``notes.#`` message on its agent's ``seen``."""

    @on("notes.#")
    async def note(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


class Service(Host):
    behaviours = [Notes]

    @rpc("echo")
    async def echo(self, msg: Message, payload: object) -> object:
        return payload

    @rpc("fail")
    async def fail(self, msg: Message, payload: object) -> object:
        raise ValueError("the handler failed on purpose")

    @rpc("slow")
    async def slow(self, msg: Message, payload: object) -> object:
        await self.release.wait()
        return "late"


@dataclass
class Mesh:
    """A mesh provisioned from ``POLICY`` on the test's vhost and namespace."""

    settings: Settings
    """The administrator's (the test's own)."""
    policy_file: Path
    policy: Policy
    credentials: CredentialStore

    def under(self, principal: str) -> Settings:
        """Settings of ``principal``'s broker and Redis user, with the policy."""
        variables = self.credentials.variables(principal)
        return self.settings.model_copy(
            update={
                "amqp_url": variables["MESH_AMQP_URL"],
                "redis_url": variables["MESH_REDIS_URL"],
                "policy": str(self.policy_file),
            }
        )

    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, user: str) -> str:
        """``user``'s token, issued on first use (a user has one at a time)."""
        if user not in self.tokens:
            self.tokens[user] = TokenStore.for_policy(self.policy).issue(user)
        return self.tokens[user]

    def revoke(self, user: str) -> None:
        TokenStore.for_policy(self.policy).revoke(user)
        del self.tokens[user]


async def provisioned(settings: Settings, directory: Path, text: str = POLICY) -> Mesh:
    policy_file = directory / "policy.yaml"
    policy_file.write_text(text)
    policy = load_policy(policy_file)
    store = CredentialStore(directory / "credentials")
    objects = mesh_objects(settings)
    plan = build_plan(policy, settings.namespace, vhost_of(settings), objects=objects)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        await provision(
            plan,
            store,
            settings.amqp_url,
            ManagementAPI.for_settings(settings),
            redis=redis,
            redis_url=settings.redis_url,
        )
    finally:
        await redis.aclose()
    return Mesh(settings, policy_file, policy, store)


async def delete_users(settings: Settings) -> None:
    """The broker and Redis users of the test's namespace."""
    api = ManagementAPI.for_settings(settings)
    for user in await api.users():
        if user.name.startswith(f"{settings.namespace}."):
            await api.delete_user(user.name)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        for name in await redis.acl_users():
            if name.startswith(f"{settings.namespace}."):
                await redis.acl_deluser(name)
    finally:
        await redis.aclose()


@pytest.fixture(name="mesh")
async def mesh_fixture(settings: Settings, tmp_path: Path) -> AsyncIterator[Mesh]:
    """``POLICY`` provisioned; its users are deleted afterwards."""
    try:
        yield await provisioned(settings, tmp_path)
    finally:
        await delete_users(settings)


@dataclass
class Running:
    """A gateway, a ``Service`` (``svc``) and the bridge, running; ``client`` calls the
    bridge's app (REST) and ``url`` is where uvicorn serves it, if it does."""

    mesh: Mesh
    bridge: Bridge
    service: Service
    client: httpx.AsyncClient
    url: str | None = None

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.mesh.token(user)}"}


CONFIG = BridgeConfig(recheck=0.2)

KEY = SecretStr("bridge-tests-audit-key-of-32-chars!")
"""The gateway's audit key: it keeps the tamper-evident trail ``/audit`` reads."""


@asynccontextmanager
async def running_bridge(
    mesh: Mesh,
    *,
    config: BridgeConfig = CONFIG,
    bridge_policy: Policy | None = None,
    serve: bool = False,
) -> AsyncIterator[Running]:
    """The mesh's gateway (enforcing ``mesh.policy``), ``svc`` and a bridge (deciding by
    ``bridge_policy``, by default the same), each as its principal's user."""
    service = Service("svc", settings=mesh.under("service"))
    if serve:
        config = replace(config, port=free_port())
    bridge = Bridge(
        mesh.under("bridge"),
        config,
        bridge_policy or mesh.policy,
        tokens=TokenStore.for_policy(mesh.policy),
    )
    async with AsyncExitStack() as stack:
        gateway = Gateway(settings=mesh.under("gateway").model_copy(update={"audit_key": KEY}))
        await stack.enter_async_context(running(gateway, service))
        await stack.enter_async_context(bridge)
        transport = httpx.ASGITransport(app=create_app(bridge))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://bridge")
        )
        url = None
        if serve:
            url = await stack.enter_async_context(served(bridge))
        yield Running(mesh, bridge, service, client, url)
        service.release.set()


@asynccontextmanager
async def served(bridge: Bridge) -> AsyncIterator[str]:
    """``bridge`` served by uvicorn (its app's lifespan starts and stops it): host:port."""
    uvicorn = server(bridge)
    task = asyncio.create_task(uvicorn.serve())
    try:
        await eventually(lambda: uvicorn.started or task.done(), what="uvicorn started")
        if task.done():
            task.result()
        yield f"127.0.0.1:{bridge.config.port}"
    finally:
        uvicorn.should_exit = True
        await task
