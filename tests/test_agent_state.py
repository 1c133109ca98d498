"""Typed agent and behaviour state (``state_model``): restored on start, validated, and
written with compare-and-set so replicas never lose an update. Real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from agents_registry import INCREMENTS, REPLICAS, mesh_run
from helpers import eventually, free_port, running
from pydantic import BaseModel, Field

from behaviours import SubscriberBehaviour
from mesh import (
    Agent,
    InvalidState,
    Message,
    Settings,
    StateError,
    StateUnavailable,
    on,
)
from mesh.gateway import Gateway
from mesh.registry import Registry
from mesh.state import state_key


class Profile(BaseModel):
    count: int = 0
    label: str = "new"
    tags: list[str] = Field(default_factory=list)


class Profiled(Agent):
    state_model = Profile


async def stored(redis: aioredis.Redis, key: str) -> tuple[int, dict[str, Any]] | None:
    """The version and data kept at ``key``, or None if nothing is stored."""
    version, data = await redis.hmget(key, ["v", "data"])
    if data is None:
        return None
    return int(version), json.loads(data)


async def test_state_starts_from_defaults_and_is_restored_on_restart(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A new agent's state is the model's defaults; what it writes is in Redis, and an agent
    started again with the same id (another instance) starts from that state."""
    key = state_key(settings.namespace, "profiled")
    async with Profiled("profiled", settings=settings, instance="first") as first:
        assert first.state == Profile()
        assert await stored(redis, key) is None

        value = await first.update_state(count=3, label="three")
        assert value == Profile(count=3, label="three")
        assert first.state == value
        assert await stored(redis, key) == (1, {"count": 3, "label": "three", "tags": []})

        value = await first.update_state({"tags": ["a", "b"]})
        assert value == Profile(count=3, label="three", tags=["a", "b"])

    async with Profiled("profiled", settings=settings, instance="second") as second:
        assert second.state == Profile(count=3, label="three", tags=["a", "b"])
        await second.update_state(lambda s: {"count": s.count + 1})
        assert await stored(redis, key) == (3, {"count": 4, "label": "three", "tags": ["a", "b"]})

    async with Profiled("someone-else", settings=settings) as other:
        assert other.state == Profile()


async def test_update_state_with_a_function_of_the_current_state(settings: Settings) -> None:
    """A change may be a function returning a mapping or a whole new model; it sees the
    current state and does not mutate it."""
    async with Profiled("profiled", settings=settings) as agent:
        before = agent.state
        value = await agent.update_state(lambda s: {"count": s.count + 10})
        assert value.count == 10
        assert before == Profile()

        value = await agent.update_state(lambda s: s.model_copy(update={"label": f"n{s.count}"}))
        assert value == Profile(count=10, label="n10")

        def mutate(s: Profile) -> Profile:
            s.tags.append("x")
            return s

        value = await agent.update_state(mutate)
        assert value.tags == ["x"]


async def test_invalid_change_raises_invalid_state_and_writes_nothing(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A value of the wrong type, or an unknown field, raises InvalidState naming the field;
    neither Redis nor ``self.state`` changes."""
    key = state_key(settings.namespace, "profiled")
    async with Profiled("profiled", settings=settings) as agent:
        await agent.update_state(count=1, label="one")
        before = await redis.hgetall(key)
        state_before = agent.state

        with pytest.raises(InvalidState, match="count") as wrong_type:
            await agent.update_state(count="many")
        assert isinstance(wrong_type.value, ValueError)
        with pytest.raises(InvalidState, match="tags"):
            await agent.update_state(lambda s: {"tags": "not-a-list-of-str", "count": 2})
        with pytest.raises(InvalidState, match="bogus"):
            await agent.update_state(bogus=1)
        with pytest.raises(InvalidState, match="label"):
            await agent.update_state({"label": None})

        assert await redis.hgetall(key) == before
        assert agent.state == state_before == Profile(count=1, label="one")

        # and the agent can still write a valid change afterwards
        assert (await agent.update_state(count=2)).count == 2


async def test_agent_without_state_model_has_no_state(settings: Settings) -> None:
    """Without ``state_model`` both ``state`` and ``update_state`` raise StateError."""
    async with Agent("stateless", settings=settings) as agent:
        with pytest.raises(StateError, match="state_model"):
            _ = agent.state
        with pytest.raises(StateError, match="state_model"):
            await agent.update_state(count=1)


class Seen(BaseModel):
    messages: int = 0
    last: str | None = None


class Counts(SubscriberBehaviour):
    state_model = Seen

    @on("counts.item")
    async def item(self, msg: Message, payload: object) -> None:
        await self.update_state(lambda s: {"messages": s.messages + 1, "last": msg.message_id})
        agent = self.agent
        assert isinstance(agent, WithBehaviourState)
        agent.handled.put_nowait(msg.message_id)


class WithBehaviourState(Agent):
    state_model = Profile
    behaviours = [Counts]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled: asyncio.Queue[str] = asyncio.Queue()


async def test_behaviour_state_is_kept_apart_and_restored(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A behaviour's ``state_model`` has its own key (agent + behaviour), separate from the
    agent's state, and is restored when the agent restarts."""
    gateway = Gateway(settings=settings)
    publisher = Agent("publisher", settings=settings)
    async with running(gateway, publisher):
        async with WithBehaviourState("holder", settings=settings) as agent:
            sent = [await publisher.publish("counts.item", {"n": i}) for i in range(3)]
            async with asyncio.timeout(10):
                handled = [await agent.handled.get() for _ in sent]
            assert handled == sent
            behaviour = agent.behaviour("counts")
            assert behaviour.state == Seen(messages=3, last=sent[-1])
            assert agent.state == Profile()
            await agent.update_state(label="agent")

        key = state_key(settings.namespace, "holder", "counts")
        assert await stored(redis, key) == (3, {"messages": 3, "last": sent[-1]})
        agent_state = await stored(redis, state_key(settings.namespace, "holder"))
        assert agent_state is not None
        assert agent_state[1]["label"] == "agent"

        async with WithBehaviourState("holder", settings=settings) as again:
            assert again.behaviour("counts").state == Seen(messages=3, last=sent[-1])
            assert again.state.label == "agent"


class Tally(BaseModel):
    count: int = 0


class Replica(Agent):
    state_model = Tally

    async def increment(self, times: int) -> None:
        for _ in range(times):
            await self.update_state(lambda s: {"count": s.count + 1})


async def test_two_replicas_incrementing_concurrently_lose_no_update(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Two instances of one agent (each with its own Redis connection) apply 1,000 increments
    each at the same time through update_state; the stored count is exactly 2,000."""
    one = Replica("tally", settings=settings, instance="one")
    two = Replica("tally", settings=settings, instance="two")
    assert one.redis is not two.redis
    async with running(one, two):
        await asyncio.gather(one.increment(1000), two.increment(1000))
        assert await stored(redis, state_key(settings.namespace, "tally")) == (
            2000,
            {"count": 2000},
        )
        # Each replica's own view ends at or below the total, never above it.
        assert max(one.state.count, two.state.count) == 2000


async def test_two_processes_incrementing_concurrently_lose_no_update(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Two ``mesh run`` processes of the same agent each apply 1,000 increments through
    update_state at the same time; the stored count is exactly 2,000."""
    assert (INCREMENTS, REPLICAS) == (1000, 2)
    registry = Registry(redis, settings.namespace, settings.heartbeat_ttl)
    key = state_key(settings.namespace, "counter")
    async with (
        mesh_run(settings, "Counter", "counter", "p1", tmp_path) as p1,
        mesh_run(settings, "Counter", "counter", "p2", tmp_path) as p2,
    ):

        async def both_ended() -> list[tuple[str, str, int | None]]:
            p1.check_running()
            p2.check_running()
            ended = []
            for inst in await registry.instances(agent="counter"):
                [b] = [b for b in inst.behaviours if b.name == "increment"]
                if b.state in ("done", "failed"):
                    ended.append((inst.instance, b.state, b.exit_code))
            return ended if len(ended) == 2 else []

        ended = await eventually(both_ended, timeout=45)
        assert sorted(ended) == [("p1", "done", 0), ("p2", "done", 0)], p1.output() + p2.output()
        assert await stored(redis, key) == (2000, {"count": 2000})
        assert await p1.terminate() == 0, p1.output()
        assert await p2.terminate() == 0, p2.output()


async def test_state_write_without_redis_raises_state_unavailable(settings: Settings) -> None:
    """With Redis unreachable the agent still starts (defaults), and a state write raises
    StateUnavailable saying where Redis was expected."""
    port = free_port()
    unreachable = settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{port}/0", "heartbeat_interval": 0.2}
    )
    async with Profiled("offline", settings=unreachable) as agent:
        assert agent.state == Profile()
        with pytest.raises(StateUnavailable, match=f"127.0.0.1:{port}") as caught:
            await agent.update_state(count=1)
        assert "unreachable" in str(caught.value)
        assert isinstance(caught.value, StateError)
        assert agent.state == Profile()
