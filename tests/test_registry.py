"""The Redis registry against a real Redis: records, leases, discovery."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from mesh.registry import AgentRecord, BehaviourRecord, InstanceRecord, Registry
from mesh.topology import TopicError


class IndexedRegistry(Registry):
    """Registers as an instance does, and indexes at once as the gateway does when the
    instance's registry event passes: what tests of discovery need."""

    async def register(self, record: InstanceRecord) -> str:
        tag = await super().register(record)
        await self.index(record.agent, record.instance)
        return tag

    async def deregister(self, agent: str, instance: str) -> None:
        await super().deregister(agent, instance)
        await self.index(agent, instance)


@pytest.fixture
def registry(redis: aioredis.Redis, namespace: str) -> Registry:
    return IndexedRegistry(redis, namespace, ttl=30)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Poll ``check`` until it holds; TimeoutError if it does not within the deadline."""
    async with asyncio.timeout(within):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)


def record(
    agent: str,
    instance: str = "i1",
    *,
    capabilities: list[str] | None = None,
    bindings: dict[str, list[str]] | None = None,
) -> InstanceRecord:
    return InstanceRecord(
        agent=agent,
        instance=instance,
        capabilities=capabilities or [],
        behaviours=[
            BehaviourRecord(
                name=name, kind="SubscriberBehaviour", state="running", binding_keys=keys
            )
            for name, keys in (bindings or {}).items()
        ],
    )


async def test_register_round_trips_every_field(registry: Registry) -> None:
    started = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    rec = InstanceRecord(
        agent="v7",
        instance="pod-a",
        capabilities=["telemetry", "status"],
        metadata={
            "zone": "eu-1",
            "rack": 3,
            "tags": ["a", "b"],
            "nested": {"x": None},
            "who": "Zoë ✓",
        },
        behaviours=[
            BehaviourRecord(
                name="watch", kind="SubscriberBehaviour", state="running", binding_keys=["a.*"]
            ),
            BehaviourRecord(name="boot", kind="OneShotBehaviour", state="done", exit_code=0),
            BehaviourRecord(name="bad", kind="CyclicBehaviour", state="failed", exit_code=2),
        ],
        host="node-3",
        pid=4242,
        version="1.2.3",
        started_at=started,
    )
    before = datetime.now(UTC)
    await registry.register(rec)

    [got] = await registry.instances(agent="v7")
    assert got.model_dump(exclude={"heartbeat_at"}) == rec.model_dump(exclude={"heartbeat_at"})
    assert got.started_at == started
    assert got.alive
    # heartbeat_at comes from Redis's clock; allow for skew with this host
    assert abs(got.heartbeat_at - before) < timedelta(seconds=5)
    assert got.heartbeat_at.tzinfo is not None


async def test_register_replaces_the_record(registry: Registry) -> None:
    await registry.register(record("a", capabilities=["old"], bindings={"b": ["x.old"]}))
    await registry.register(record("a", capabilities=["new"], bindings={"b": ["x.new"]}))

    [got] = await registry.instances(agent="a")
    assert got.capabilities == ["new"]
    assert await registry.instances(capability="old") == []
    assert await registry.instances(topic="x.old") == []
    assert [r.agent for r in await registry.instances(capability="new")] == ["a"]
    assert await registry.receivers("x.new") == [("a", "b")]


async def test_another_reader_sees_every_change(
    registry: Registry, redis: aioredis.Redis, namespace: str
) -> None:
    # a reader in another process keeps parsed records; changes must still show
    reader = Registry(redis, namespace, ttl=30, cache_size=2)
    for n in range(5):
        await registry.register(record("a", f"i{n}", bindings={"b": ["t.x"]}))
    assert [r.instance for r in await reader.instances(agent="a")] == [f"i{n}" for n in range(5)]
    changed = InstanceRecord(
        agent="a",
        instance="i3",
        behaviours=[BehaviourRecord(name="b", kind="K", state="failed", exit_code=1)],
    )
    await registry.register(changed)
    for _ in range(3):  # the small cache is refilled as it goes
        found = {r.instance: r for r in await reader.instances(agent="a")}
        assert len(found) == 5
        assert found["i3"].behaviours[0].state == "failed"
        assert found["i3"].behaviours[0].exit_code == 1
        assert found["i2"].behaviours[0].binding_keys == ["t.x"]
    assert await reader.receivers("t.x") == [("a", "b")]
    assert [r.instance for r in await reader.instances(topic="t.x")] == ["i0", "i1", "i2", "i4"]


async def test_heartbeat_renews_and_reports_a_lost_record(registry: Registry) -> None:
    await registry.register(record("a"))
    [first] = await registry.instances(agent="a")
    assert await registry.heartbeat("a", "i1")
    await eventually(lambda: _heartbeat_moved(registry, first.heartbeat_at), within=2.0)
    assert not await registry.heartbeat("a", "nope")


async def _heartbeat_moved(registry: Registry, since: datetime) -> bool:
    await registry.heartbeat("a", "i1")
    [now] = await registry.instances(agent="a")
    return now.heartbeat_at > since


async def test_lapsed_instance_disappears_by_itself(redis: aioredis.Redis, namespace: str) -> None:
    short = IndexedRegistry(redis, namespace, ttl=0.5, retention=0.5)
    await short.register(record("gone", capabilities=["c"], bindings={"b": ["t.#"]}))
    await short.register(record("kept", capabilities=["c"], bindings={"b": ["t.#"]}))
    assert len(await short.instances(capability="c")) == 2

    async def only_kept() -> bool:
        # "kept" renews its lease; "gone" stopped heartbeating
        assert await short.heartbeat("kept", "i1")
        return [r.agent for r in await short.instances(capability="c")] == ["kept"]

    await eventually(only_kept)
    # gone from every kind of answer
    assert [r.agent for r in await short.instances()] == ["kept"]
    assert await short.instances(agent="gone") == []
    assert await short.agent("gone") is None
    assert [a.agent for a in await short.agents(topic="t.x")] == ["kept"]
    assert await short.receivers("t.x") == [("kept", "b")]

    async def record_deleted() -> bool:
        assert await short.heartbeat("kept", "i1")
        return await redis.exists(f"{namespace}:registry:inst:gone:i1") == 0

    await eventually(record_deleted)
    assert not await short.heartbeat("gone", "i1")
    assert [r.agent for r in await short.instances(alive=False)] == ["kept"]


async def test_alive_false_shows_recently_lapsed_instances(
    redis: aioredis.Redis, namespace: str
) -> None:
    short = IndexedRegistry(redis, namespace, ttl=0.3, retention=60)
    await short.register(record("a", capabilities=["c"]))

    async def lapsed() -> bool:
        return await short.instances(capability="c") == []

    await eventually(lapsed)
    [dead] = await short.instances(capability="c", alive=False)
    assert dead.agent == "a" and dead.alive is False
    agent = await short.agent("a", alive=False)
    assert agent is not None and agent.alive is False
    assert await short.agent("a") is None
    # a heartbeat within the retention brings it back
    assert await short.heartbeat("a", "i1")
    [back] = await short.instances(capability="c")
    assert back.alive


async def test_discovery_filters(registry: Registry) -> None:
    await registry.register(
        record("v1", "i1", capabilities=["telemetry"], bindings={"report": ["vehicle.v1.cmd"]})
    )
    await registry.register(
        record(
            "v1", "i2", capabilities=["telemetry", "gps"], bindings={"report": ["vehicle.v1.cmd"]}
        )
    )
    await registry.register(
        record("watch", capabilities=["alerts"], bindings={"speed": ["vehicle.*.speed"]})
    )
    await registry.register(
        record("audit", capabilities=["alerts"], bindings={"all": ["vehicle.#"], "x": ["other"]})
    )
    await registry.register(record("idle"))

    def ids(found: list[InstanceRecord]) -> list[tuple[str, str]]:
        return [(r.agent, r.instance) for r in found]

    assert ids(await registry.instances(capability="telemetry")) == [("v1", "i1"), ("v1", "i2")]
    assert ids(await registry.instances(capability="gps")) == [("v1", "i2")]
    assert ids(await registry.instances(capability="nothing")) == []
    assert ids(await registry.instances(agent="v1")) == [("v1", "i1"), ("v1", "i2")]
    assert ids(await registry.instances(agent="v1", capability="gps")) == [("v1", "i2")]
    assert ids(await registry.instances(agent="nobody")) == []
    assert len(await registry.instances()) == 5
    # topic: '*' is one word, '#' any number, literal patterns exactly
    assert ids(await registry.instances(topic="vehicle.v9.speed")) == [
        ("audit", "i1"),
        ("watch", "i1"),
    ]
    assert ids(await registry.instances(topic="vehicle.v1.cmd")) == [
        ("audit", "i1"),
        ("v1", "i1"),
        ("v1", "i2"),
    ]
    assert ids(await registry.instances(topic="vehicle")) == [("audit", "i1")]
    assert ids(await registry.instances(topic="vehicle.a.b.speed")) == [("audit", "i1")]
    assert ids(await registry.instances(topic="other")) == [("audit", "i1")]
    assert ids(await registry.instances(topic="nothing.here")) == []
    assert ids(await registry.instances(topic="vehicle.v2.speed", capability="telemetry")) == []
    assert ids(await registry.instances(topic="vehicle.v2.speed", agent="watch")) == [
        ("watch", "i1")
    ]
    with pytest.raises(TopicError):
        await registry.instances(topic="vehicle.*.speed")

    agents = await registry.agents(capability="telemetry")
    assert [a.agent for a in agents] == ["v1"]
    assert agents[0].capabilities == ["gps", "telemetry"]
    assert [a.agent for a in await registry.agents(capability="alerts")] == ["audit", "watch"]
    assert [a.agent for a in await registry.agents()] == ["audit", "idle", "v1", "watch"]


async def test_agent_record(registry: Registry) -> None:
    await registry.register(record("v1", "i1", capabilities=["a"]))
    await registry.register(record("v1", "i2", capabilities=["b", "a"]))
    agent = await registry.agent("v1")
    assert isinstance(agent, AgentRecord)
    assert agent.agent == "v1"
    assert [i.instance for i in agent.instances] == ["i1", "i2"]
    assert agent.capabilities == ["a", "b"]
    assert agent.alive
    assert agent.last_heartbeat == max(i.heartbeat_at for i in agent.instances)
    assert await registry.agent("nobody") is None
    # the models serialise cleanly for the bridge
    assert AgentRecord.model_validate_json(agent.model_dump_json()) == agent


async def test_receivers(registry: Registry) -> None:
    await registry.register(
        record("w", "i1", bindings={"speed": ["vehicle.*.speed"], "log": ["#"], "cmd": ["c.x"]})
    )
    await registry.register(record("w", "i2", bindings={"speed": ["vehicle.*.speed"]}))
    await registry.register(record("z", bindings={"one": ["vehicle.v1.speed"]}))
    assert await registry.receivers("vehicle.v1.speed") == [
        ("w", "log"),
        ("w", "speed"),
        ("z", "one"),
    ]
    assert await registry.receivers("vehicle.v2.speed") == [("w", "log"), ("w", "speed")]
    assert await registry.receivers("c.x") == [("w", "cmd"), ("w", "log")]
    assert await registry.receivers("_req.w.status") == [("w", "log")]


async def test_deregister(registry: Registry, redis: aioredis.Redis, namespace: str) -> None:
    await registry.register(record("a", capabilities=["c"], bindings={"b": ["t.*"]}))
    await registry.register(record("a", "i2", capabilities=["c"], bindings={"b": ["t.*"]}))
    await registry.deregister("a", "i1")
    assert [r.instance for r in await registry.instances(capability="c", alive=False)] == ["i2"]
    assert [r.instance for r in await registry.instances(topic="t.x")] == ["i2"]
    assert not await registry.heartbeat("a", "i1")
    await registry.deregister("a", "i2")
    assert await registry.agent("a", alive=False) is None
    assert await registry.receivers("t.x") == []
    await registry.deregister("a", "i2")  # idempotent
    # nothing is left behind, not even the wildcard bucket
    assert [k async for k in redis.scan_iter(match=f"{namespace}:registry:*")] == []


async def test_rejects_bad_names(registry: Registry) -> None:
    with pytest.raises(TopicError):
        await registry.register(record("bad:name"))
    with pytest.raises(TopicError):
        await registry.register(record("a", bindings={"b": ["bad..pattern"]}))
    with pytest.raises(ValueError):
        await registry.register(record("a", capabilities=[""]))


async def test_an_instance_is_discovered_by_capability_or_topic_once_indexed(
    redis: aioredis.Redis, namespace: str
) -> None:
    """An instance writes only its own record; the shared indexes wait for the gateway."""
    own = Registry(redis, namespace, ttl=30)
    rec = record("a", capabilities=["c"], bindings={"b": ["t.*"]})
    tag = await own.register(rec)
    assert [r.instance for r in await own.instances(agent="a")] == ["i1"]
    assert await own.instances(capability="c") == []
    assert await own.instances(topic="t.x") == []
    assert await own.instances() == []
    assert await own.renew("a", "i1", tag) == (True, False)
    assert not await own.indexed("a", "i1", tag)

    assert await own.index("a", "i1")
    assert await own.indexed("a", "i1", tag)
    assert await own.renew("a", "i1", tag) == (True, True)
    assert [r.instance for r in await own.instances(capability="c")] == ["i1"]
    assert await own.receivers("t.x") == [("a", "b")]
    # a changed record is not the one indexed until the gateway indexes it again
    newer = await own.register(record("a", capabilities=["d"]))
    assert not await own.indexed("a", "i1", newer)


async def test_a_record_about_someone_else_is_neither_indexed_nor_shown(
    redis: aioredis.Redis, namespace: str, registry: Registry
) -> None:
    """An instance can write its own keys only; what it writes there about another agent
    must not make that agent appear."""
    await registry.register(record("v8", capabilities=["c"]))
    forged = record("v8", "fake", capabilities=["c"])
    body = forged.model_dump_json(exclude={"heartbeat_at", "alive"})
    await redis.set(f"{namespace}:registry:inst:v7:fake", f"30000:90000:00ff:{body}", px=60_000)
    await redis.sadd(f"{namespace}:registry:agent:v7", "v7:fake")
    with pytest.raises(ValueError, match="describes v8:fake"):
        await registry.index("v7", "fake")
    assert await registry.instances(agent="v7") == []
    assert [r.instance for r in await registry.instances(agent="v8")] == ["i1"]
    assert [r.instance for r in await registry.instances(capability="c")] == ["i1"]


async def test_sweep_takes_instances_whose_records_lapsed_out_of_the_indexes(
    redis: aioredis.Redis, namespace: str
) -> None:
    short = IndexedRegistry(redis, namespace, ttl=0.2, retention=0)
    await short.register(record("gone", capabilities=["c"], bindings={"b": ["t.#"]}))
    await short.register(record("kept", capabilities=["c"], bindings={"b": ["t.*"]}))
    assert await short.sweep() == 0

    async def gone_lapsed() -> bool:
        await short.heartbeat("kept", "i1")
        return not await redis.exists(f"{namespace}:registry:inst:gone:i1")

    await eventually(gone_lapsed)
    assert await short.sweep() == 1
    assert await redis.smembers(f"{namespace}:registry:live") == {b"kept:i1"}
    assert await redis.smembers(f"{namespace}:registry:wild:t") == {b"t.*"}
    assert not await redis.exists(f"{namespace}:registry:idx:gone:i1")
