"""Per-principal Redis users: what an agent's user may and may not do to the mesh's keys.

Each attack runs as the Redis user ``mesh provision`` made for the ``vehicles`` principal
(agents ``v[0-9]*``) against the real Redis, and must be refused by Redis itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import AuthenticationError, NoPermissionError

from mesh import Settings
from mesh.management import vhost_of
from mesh.policy import parse_policy
from mesh.provision import CredentialStore, build_plan, provision
from mesh.provision.redis_users import redis_user
from mesh.registry import BehaviourRecord, InstanceRecord, Registry
from mesh.state import StateStore

POLICY = """\
principals:
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
  monitor: {kind: agent}
  gateway: {kind: gateway}
  ops: {kind: operator, agents: ["client-*"]}
"""


class Speed(BaseModel):
    kmh: int = 0


@pytest.fixture
async def as_principal(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[Callable[[str], aioredis.Redis]]:
    """Provisions POLICY's Redis users (no broker); gives a client logged in as one."""
    plan = build_plan(parse_policy(POLICY), settings.namespace, vhost_of(settings))
    store = CredentialStore(tmp_path / "creds")
    await provision(plan, store, settings.amqp_url, None, redis=redis, redis_url=settings.redis_url)
    clients: list[aioredis.Redis] = []

    def login(principal: str) -> aioredis.Redis:
        variables = store.variables(principal)
        assert variables is not None
        client = aioredis.Redis.from_url(variables["MESH_REDIS_URL"])
        clients.append(client)
        return client

    try:
        yield login
    finally:
        for client in clients:
            await client.aclose()
        for user in plan.users:
            await redis.acl_deluser(user.name)


async def refused(action: Awaitable[object]) -> bool:
    try:
        await action
    except NoPermissionError:
        return True
    return False


async def test_an_agent_uses_its_own_state_and_no_one_elses(
    as_principal: Callable[[str], aioredis.Redis], namespace: str
) -> None:
    v7 = as_principal("vehicles")
    own = StateStore(v7, namespace)
    assert (await own.update(own.key("v7"), Speed, {"kmh": 5})).value.kmh == 5
    assert (await own.update(own.key("v7", "cruise"), Speed, {"kmh": 7})).value.kmh == 7
    assert await refused(own.load(own.key("monitor"), Speed))
    assert await refused(own.update(own.key("monitor"), Speed, {"kmh": 1}))
    assert await refused(v7.hgetall(f"{namespace}:state:monitor"))
    assert await refused(v7.delete(f"{namespace}:state:monitor"))
    # a script is checked command by command: it cannot reach further than its caller
    assert await refused(
        v7.eval("return redis.call('GET', KEYS[1])", 1, f"{namespace}:state:monitor")
    )


async def test_an_agent_writes_only_its_own_registry_entry(
    as_principal: Callable[[str], aioredis.Redis], namespace: str
) -> None:
    v7 = Registry(as_principal("vehicles"), namespace, ttl=30)
    record = InstanceRecord(
        agent="v7",
        instance="i1",
        capabilities=["telemetry"],
        behaviours=[BehaviourRecord(name="b", kind="K", binding_keys=["vehicle.#"])],
    )
    await v7.register(record)
    assert await v7.heartbeat("v7", "i1")
    monitor_record = record.model_copy(update={"agent": "monitor"})
    assert await refused(v7.register(monitor_record))
    assert await refused(v7.deregister("monitor", "i1"))
    # the shared indexes are the gateway's: an agent cannot index itself or unindex others
    assert await refused(v7.index("v7", "i1"))
    assert await refused(v7.sweep())
    assert await refused(v7.redis.sadd(f"{namespace}:registry:cap:telemetry", "v7:i1"))
    assert await refused(v7.redis.srem(f"{namespace}:registry:live", "monitor:i1"))
    # discovery reads, and so does the agent's check that a live gateway indexed it
    gateway = Registry(as_principal("gateway"), namespace, ttl=30)
    assert await gateway.index("v7", "i1")
    assert [r.agent for r in await v7.instances(capability="telemetry")] == ["v7"]


async def test_an_agent_can_run_no_keyspace_wide_or_admin_command(
    as_principal: Callable[[str], aioredis.Redis],
) -> None:
    v7 = as_principal("vehicles")
    for command in (("KEYS", "*"), ("SCAN", "0"), ("FLUSHALL",), ("CONFIG", "GET", "*")):
        assert await refused(v7.execute_command(*command)), command
    assert await refused(v7.execute_command("ACL", "SETUSER", "v7", "~*"))
    assert await refused(v7.publish("anything", "x"))


async def test_the_gateway_and_operators_use_every_key_of_their_mesh_only(
    as_principal: Callable[[str], aioredis.Redis], namespace: str
) -> None:
    for principal in ("gateway", "ops"):
        client = as_principal(principal)
        await client.set(f"{namespace}:state:monitor", "x")
        await client.scan(0)  # verifying the audit trail lists its streams
        assert await refused(client.get(f"{namespace}-other:state:monitor"))
        assert await refused(client.get("unrelated"))


def test_key_patterns_stay_within_the_agents_of_the_principal() -> None:
    policy = parse_policy(POLICY)
    vehicles = next(p for p in policy.principals() if p.name == "vehicles")
    rules = redis_user("ns", vehicles).rules
    assert "~ns:state:v[0-9]*" in rules
    assert "%R~ns:registry:*" in rules
    writable = [r.removeprefix("~ns:registry:") for r in rules if r.startswith("~ns:registry:")]
    assert writable == ["inst:v[0-9]*:*", "agent:v[0-9]*"]
    assert "&mesh-managed:ns" in rules


async def test_a_wrong_password_is_refused(
    as_principal: Callable[[str], aioredis.Redis], settings: Settings, namespace: str
) -> None:
    as_principal("vehicles")
    stranger = aioredis.Redis.from_url(
        settings.redis_url, username=f"{namespace}.vehicles", password="guessed"
    )
    try:
        with pytest.raises(AuthenticationError):
            await stranger.ping()
    finally:
        await stranger.aclose()
