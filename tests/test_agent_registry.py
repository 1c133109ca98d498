"""Agents in the Redis registry: registration, heartbeats, lapses, discovery, events, the CLI,
and riding out a Redis outage. Real RabbitMQ and Redis throughout."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from agents_registry import SLEEPER_TOPIC, Sleeper, mesh_cli, mesh_run
from helpers import PrivateRedis, eventually, running
from pydantic import BaseModel

from behaviours import OneShotBehaviour, SubscriberBehaviour
from mesh import (
    Agent,
    AgentRecord,
    BehaviourRecord,
    InstanceRecord,
    Message,
    Settings,
    StateUnavailable,
    TopicError,
    on,
    on_registry,
    rpc,
)
from mesh.gateway import Gateway
from mesh.membership import REDIS_DOWN
from mesh.registry import Registry


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """The test's settings with short heartbeats, so lapses happen within a second or so."""
    return settings.model_copy(update={"heartbeat_interval": 0.2, "heartbeat_ttl": 1.0})


def registry_of(redis: aioredis.Redis, settings: Settings) -> Registry:
    """A registry reader of the test's namespace (what ``mesh agents`` uses)."""
    return Registry(redis, settings.namespace, settings.heartbeat_ttl)


def by_name(instance: InstanceRecord) -> dict[str, BehaviourRecord]:
    return {b.name: b for b in instance.behaviours}


# --- what an instance registers ----------------------------------------------------------


class Watch(SubscriberBehaviour):
    @on("vehicle.*.speed")
    async def speed(self, msg: Message, payload: object) -> None:
        return None

    @on("alerts.#")
    async def alert(self, msg: Message, payload: object) -> None:
        return None


class Tracker(Agent):
    capabilities = ["telemetry", "storage"]
    behaviours = [Watch]
    version = "1.2.3"

    def metadata(self) -> dict[str, Any]:
        return {"zone": "eu-1", "instance": self.instance}

    @rpc("status")
    async def status(self, msg: Message, payload: object) -> dict[str, Any]:
        return {}


async def test_started_agent_registers_its_instance(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """On start an instance registers id, instance, capabilities, metadata(), behaviours
    (kind, state, binding keys), host, pid, version and start time; ping shows the same."""
    registry = registry_of(redis, settings)
    tracker = Tracker("tracker", settings=settings, instance="t1")
    async with running(Gateway(settings=settings), tracker):
        record = await registry.agent("tracker")
        assert record is not None
        assert record.agent == "tracker"
        assert record.alive
        assert record.capabilities == ["storage", "telemetry"]
        [inst] = record.instances
        assert inst.agent == "tracker"
        assert inst.instance == "t1"
        assert inst.alive
        assert sorted(inst.capabilities) == ["storage", "telemetry"]
        assert inst.metadata == {"zone": "eu-1", "instance": "t1"}
        assert inst.host == socket.gethostname()
        assert inst.pid == os.getpid()
        assert inst.version == "1.2.3"
        assert inst.started_at == tracker.started_at
        assert record.last_heartbeat == inst.heartbeat_at
        assert by_name(inst) == {
            "watch": BehaviourRecord(
                name="watch",
                kind="subscriber",
                state="running",
                binding_keys=["vehicle.*.speed", "alerts.#"],
            ),
            "rpc": BehaviourRecord(
                name="rpc", kind="rpc", state="running", binding_keys=["_req.tracker.status"]
            ),
        }

        [pong] = await tracker.ping("tracker", timeout=5.0)
        assert isinstance(pong, InstanceRecord)
        assert (pong.agent, pong.instance, pong.pid, pong.version) == (
            "tracker",
            "t1",
            os.getpid(),
            "1.2.3",
        )
        assert pong.metadata == inst.metadata
        assert pong.behaviours == inst.behaviours


class Finishes(OneShotBehaviour):
    async def run(self) -> int | None:
        return 3


class Crashes(OneShotBehaviour):
    async def run(self) -> int | None:
        raise RuntimeError("boom")


class Later(SubscriberBehaviour):
    autostart = False

    @on("later.work")
    async def work(self, msg: Message, payload: object) -> None:
        return None


class Serves(SubscriberBehaviour):
    @on("serves.work")
    async def work(self, msg: Message, payload: object) -> None:
        return None


class Lifecycle(Agent):
    behaviours = [Finishes, Crashes, Later, Serves]


async def test_registry_follows_behaviour_states_and_exit_codes(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Each behaviour's state (created/running/stopped/done/failed) and exit code is kept
    current in the registry as behaviours end, stop and start."""
    registry = registry_of(redis, settings)

    async def states() -> dict[str, tuple[str, int | None]]:
        record = await registry.agent("lifecycle")
        assert record is not None
        [inst] = record.instances
        return {b.name: (b.state, b.exit_code) for b in inst.behaviours}

    async def states_are(expected: dict[str, tuple[str, int | None]]) -> bool:
        current = await states()
        assert current == expected
        return True

    agent = Lifecycle("lifecycle", settings=settings)
    async with agent:
        await eventually(
            lambda: states_are(
                {
                    "finishes": ("done", 3),
                    "crashes": ("failed", 1),
                    "later": ("created", None),
                    "serves": ("running", None),
                }
            )
        )
        await agent.stop_behaviour("serves", exit_code=5)
        await agent.start_behaviour("later")
        await eventually(
            lambda: states_are(
                {
                    "finishes": ("done", 3),
                    "crashes": ("failed", 1),
                    "later": ("running", None),
                    "serves": ("stopped", 5),
                }
            )
        )


class EndsWhileJoining(OneShotBehaviour):
    """Ends exactly while its agent is registering (right after the record was described)."""

    async def run(self) -> int | None:
        agent = self.agent
        assert isinstance(agent, QuickStart)
        await agent.described.wait()
        return 4


class QuickStart(Agent):
    behaviours = [EndsWhileJoining]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.described = asyncio.Event()

    def metadata(self) -> dict[str, Any]:
        self.described.set()
        return {}


async def test_behaviour_that_ends_during_registration_is_recorded(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A behaviour that ends while the instance's first registration is in flight is not
    left showing ``running``: the registry catches up with its final state."""
    registry = registry_of(redis, settings)
    agent = QuickStart("quick", settings=settings)
    async with agent:
        assert await agent.behaviour("ends_while_joining").wait() == 4

        async def recorded_done() -> bool:
            record = await registry.agent("quick")
            assert record is not None
            [inst] = record.instances
            state = by_name(inst)["ends_while_joining"]
            assert (state.state, state.exit_code) == ("done", 4)
            return True

        await eventually(recorded_done, timeout=5)


# --- leases --------------------------------------------------------------------------------


async def test_heartbeats_keep_an_instance_alive_past_its_ttl(
    fast: Settings, redis: aioredis.Redis
) -> None:
    """Heartbeats renew the lease: the instance stays alive well beyond one TTL."""
    registry = registry_of(redis, fast)
    async with Sleeper("beater", settings=fast):
        first = await registry.agent("beater")
        assert first is not None
        assert first.last_heartbeat is not None
        start = first.last_heartbeat

        async def renewed_past_ttl() -> bool:
            # registry.agent answers only while a lease is current
            record = await registry.agent("beater")
            assert record is not None, "the instance lapsed while heartbeating"
            assert record.last_heartbeat is not None
            return record.last_heartbeat - start > timedelta(seconds=3 * fast.heartbeat_ttl)

        await eventually(renewed_past_ttl, timeout=15)


async def test_sigkilled_instance_disappears_when_its_lease_lapses(
    fast: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """A SIGKILLed process never deregisters; once its heartbeat lapses it drops out of every
    answer by itself, and its agent is no longer alive."""
    registry = registry_of(redis, fast)
    async with (
        running(Gateway(settings=fast)),
        mesh_run(fast, "Sleeper", "sleeper", "doomed", tmp_path) as proc,
    ):

        async def indexed() -> bool:
            proc.check_running()
            return await registry.receivers(SLEEPER_TOPIC) == [("sleeper", "poke")]

        await eventually(indexed, timeout=30)
        record = await registry.agent("sleeper")
        assert record is not None
        [inst] = record.instances
        assert (inst.instance, inst.pid, inst.version) == ("doomed", proc.pid, "7.1")
        assert inst.metadata == {"role": "sleeper"}

        await proc.kill()

        async def gone() -> bool:
            return all(i.agent != "sleeper" for i in await registry.instances())

        await eventually(gone, timeout=15)
        assert await registry.agent("sleeper") is None
        assert await registry.agents(capability="sleeping") == []
        assert await registry.instances(topic=SLEEPER_TOPIC) == []
        assert await registry.receivers(SLEEPER_TOPIC) == []
        # For the retention (3 leases) the lapsed record is still shown on request, not alive.
        lapsed = await registry.agent("sleeper", alive=False)
        assert lapsed is not None
        assert not lapsed.alive
        assert [(i.instance, i.alive) for i in lapsed.instances] == [("doomed", False)]


async def test_agent_stays_alive_while_another_instance_lives(
    fast: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """An agent is alive while any instance is: killing one replica leaves the other listed."""
    registry = registry_of(redis, fast)
    async with (
        running(Gateway(settings=fast)),
        Sleeper("sleeper", settings=fast, instance="stays"),
        mesh_run(fast, "Sleeper", "sleeper", "doomed", tmp_path) as proc,
    ):

        async def both() -> bool:
            proc.check_running()
            found = await registry.instances(agent="sleeper")
            return [i.instance for i in found] == ["doomed", "stays"]

        await eventually(both, timeout=30)
        await proc.kill()

        async def only_stays() -> bool:
            found = await registry.instances(agent="sleeper")
            return [i.instance for i in found] == ["stays"]

        await eventually(only_stays, timeout=15)
        record = await registry.agent("sleeper")
        assert record is not None
        assert record.alive
        assert [i.instance for i in record.instances] == ["stays"]
        assert [r.agent for r in await registry.agents(capability="sleeping")] == ["sleeper"]
        assert await registry.receivers(SLEEPER_TOPIC) == [("sleeper", "poke")]


# --- discovery -----------------------------------------------------------------------------


class SpeedWatch(SubscriberBehaviour):
    @on("vehicle.*.speed")
    async def speed(self, msg: Message, payload: object) -> None:
        return None


class FleetLog(SubscriberBehaviour):
    @on("vehicle.#")
    async def anything(self, msg: Message, payload: object) -> None:
        return None


class Invoices(SubscriberBehaviour):
    @on("invoice.created")
    async def created(self, msg: Message, payload: object) -> None:
        return None


class Weather(SubscriberBehaviour):
    @on("weather.#")
    async def report(self, msg: Message, payload: object) -> None:
        return None


class Speedo(Agent):
    capabilities = ["telemetry"]
    behaviours = [SpeedWatch]


class SpeedoWithGps(Speedo):
    capabilities = ["telemetry", "gps"]


class Fleet(Agent):
    capabilities = ["telemetry", "billing"]
    behaviours = [FleetLog, Invoices]


class Forecast(Agent):
    behaviours = [Weather]


async def test_discover_by_capability_and_topic(settings: Settings) -> None:
    """discover() filters live agents by capability and by the topics their behaviours
    receive (wildcards included); receivers() names the (agent, behaviour) pairs."""
    speedo1 = Speedo("speedo", settings=settings, instance="s1")
    speedo2 = SpeedoWithGps("speedo", settings=settings, instance="s2")
    fleet = Fleet("fleet", settings=settings)
    forecast = Forecast("forecast", settings=settings)
    async with running(Gateway(settings=settings), speedo1, speedo2, fleet, forecast):

        async def names(**query: Any) -> list[str]:
            return [r.agent for r in await fleet.discover(**query)]

        assert await names() == ["fleet", "forecast", "gateway", "speedo"]
        assert await names(capability="telemetry") == ["fleet", "speedo"]
        assert await names(capability="billing") == ["fleet"]
        assert await names(capability="nothing") == []
        assert await names(topic="vehicle.v7.speed") == ["fleet", "speedo"]
        assert await names(topic="vehicle.v7.fuel") == ["fleet"]
        assert await names(topic="vehicle") == ["fleet"]
        assert await names(topic="invoice.created") == ["fleet"]
        assert await names(topic="weather.berlin.today") == ["forecast"]
        assert await names(topic="nobody.listens") == []
        assert await names(capability="telemetry", topic="vehicle.v7.speed") == [
            "fleet",
            "speedo",
        ]
        assert await names(capability="billing", topic="weather.today") == []

        speedo = next(
            r for r in await fleet.discover(topic="vehicle.v1.speed") if r.agent == "speedo"
        )
        assert speedo.alive
        assert [i.instance for i in speedo.instances] == ["s1", "s2"]
        assert speedo.capabilities == ["gps", "telemetry"]
        [gps] = await fleet.discover(capability="gps")
        assert (gps.agent, [i.instance for i in gps.instances]) == ("speedo", ["s2"])

        registry = fleet.registry
        assert await registry.receivers("vehicle.v7.speed") == [
            ("fleet", "fleet_log"),
            ("speedo", "speed_watch"),
        ]
        assert await registry.receivers("invoice.created") == [("fleet", "invoices")]
        assert await registry.receivers("nobody.listens") == []
        with pytest.raises(TopicError):
            await fleet.discover(topic="vehicle.*.speed")


# --- registry events -----------------------------------------------------------------------


class RegistryWatch(SubscriberBehaviour):
    @on_registry()
    async def event(self, msg: Message, payload: object) -> None:
        agent = self.agent
        assert isinstance(agent, Observer)
        agent.events.put_nowait(msg)


class Observer(Agent):
    behaviours = [RegistryWatch]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: asyncio.Queue[Message] = asyncio.Queue()

    async def next_about(self, agent_id: str, timeout: float = 10.0) -> Message:
        """The next registry event about ``agent_id`` (others are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.events.get()
                if isinstance(msg.payload, dict) and msg.payload.get("agent") == agent_id:
                    return msg


class Joiner(Agent):
    capabilities = ["joining"]
    behaviours = [Later]


async def test_join_behaviour_and_leave_events_are_published(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Joining, behaviour state changes and leaving are announced on ``_registry.join``,
    ``_registry.behaviour`` and ``_registry.leave``; a graceful stop deregisters at once."""
    registry = registry_of(redis, settings)
    observer = Observer("observer", settings=settings)
    async with running(Gateway(settings=settings), observer):
        joiner = Joiner("joiner", settings=settings, instance="j1")
        await joiner.start()
        try:
            joined = await observer.next_about("joiner")
            assert joined.topic == "_registry.join"
            assert joined.app_id == "joiner"
            record = InstanceRecord.model_validate(joined.payload)
            assert (record.agent, record.instance, record.capabilities) == (
                "joiner",
                "j1",
                ["joining"],
            )
            assert [(b.name, b.state) for b in record.behaviours] == [("later", "created")]

            await joiner.start_behaviour("later")
            changed = await observer.next_about("joiner")
            assert changed.topic == "_registry.behaviour"
            assert changed.payload["behaviour"] == "later"
            assert by_name(InstanceRecord.model_validate(changed.payload))["later"].state == (
                "running"
            )

            await joiner.stop_behaviour("later", exit_code=2)
            changed = await observer.next_about("joiner")
            assert changed.topic == "_registry.behaviour"
            later = by_name(InstanceRecord.model_validate(changed.payload))["later"]
            assert (later.state, later.exit_code) == ("stopped", 2)
        finally:
            await joiner.stop()

        # Deregistered by the stop itself, not left to lapse: not even alive=False shows it.
        assert await registry.agent("joiner") is None
        assert await registry.agent("joiner", alive=False) is None
        assert all(i.agent != "joiner" for i in await registry.instances(alive=False))

        left = await observer.next_about("joiner")
        assert left.topic == "_registry.leave"
        assert left.payload == {"agent": "joiner", "instance": "j1"}


# --- the CLI -------------------------------------------------------------------------------


async def test_cli_agents_lists_and_shows_registered_agents(settings: Settings) -> None:
    """``mesh agents`` and ``mesh agents show ID`` (text and --json) answer from the registry;
    an unknown id is an error."""
    async with running(
        Gateway(settings=settings),
        Sleeper("cli-a", settings=settings, instance="a1"),
        Sleeper("cli-a", settings=settings, instance="a2"),
        Fleet("cli-b", settings=settings, instance="b1"),
    ):
        code, out, err = await mesh_cli(settings, "agents", "--json")
        assert code == 0, err
        records = [AgentRecord.model_validate(r) for r in json.loads(out)]
        assert [r.agent for r in records] == ["cli-a", "cli-b", "gateway"]
        a, b, _ = records
        assert [i.instance for i in a.instances] == ["a1", "a2"]
        assert a.alive
        assert a.capabilities == ["sleeping"]
        assert a.instances[0].metadata == {"role": "sleeper"}
        assert a.instances[0].pid == os.getpid()
        assert by_name(a.instances[0])["poke"] == BehaviourRecord(
            name="poke", kind="subscriber", state="running", binding_keys=[SLEEPER_TOPIC]
        )
        assert b.capabilities == ["billing", "telemetry"]

        code, out, err = await mesh_cli(settings, "agents", "--capability", "billing", "--json")
        assert code == 0, err
        assert [r["agent"] for r in json.loads(out)] == ["cli-b"]

        code, out, err = await mesh_cli(settings, "agents", "--topic", "vehicle.x.y", "--json")
        assert code == 0, err
        assert [r["agent"] for r in json.loads(out)] == ["cli-b"]

        code, out, err = await mesh_cli(settings, "agents")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:2] == ["AGENT", "INSTANCES"]
        row_a = next(line for line in lines if line.startswith("cli-a"))
        assert row_a.split()[1:4] == ["2", "poke", "sleeping"]
        assert any(line.startswith("cli-b") for line in lines)

        code, out, err = await mesh_cli(settings, "agents", "show", "cli-a", "--json")
        assert code == 0, err
        shown = AgentRecord.model_validate(json.loads(out))
        assert shown.agent == "cli-a"
        assert [i.instance for i in shown.instances] == ["a1", "a2"]
        assert shown.instances[1].version == "7.1"

        code, out, err = await mesh_cli(settings, "agents", "show", "cli-a")
        assert code == 0, err
        assert "agent cli-a" in out
        assert "instance a1" in out
        assert "instance a2" in out
        assert '"role": "sleeper"' in out
        assert "poke" in out
        assert SLEEPER_TOPIC in out

        code, out, err = await mesh_cli(settings, "agents", "show", "nobody")
        assert code != 0
        assert "nobody" in err


# --- a Redis outage ------------------------------------------------------------------------


class Tally(BaseModel):
    count: int = 0


class Pinged(SubscriberBehaviour):
    @on("outage.ping")
    async def ping(self, msg: Message, payload: object) -> None:
        agent = self.agent
        assert isinstance(agent, Survivor)
        agent.pings.put_nowait(msg)


class Survivor(Agent):
    state_model = Tally
    behaviours = [Pinged]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pings: asyncio.Queue[Message] = asyncio.Queue()


async def test_agent_rides_out_a_redis_outage(fast: Settings, private_redis: PrivateRedis) -> None:
    """With Redis down, messages are still handled and state writes raise StateUnavailable;
    when Redis is back the instance registers again by itself."""
    survivor_settings = fast.model_copy(update={"redis_url": private_redis.url})
    survivor = Survivor("survivor", settings=survivor_settings, instance="s1")
    sender = Agent("sender", settings=fast)

    async def registered() -> bool:
        client = aioredis.Redis.from_url(private_redis.url, socket_connect_timeout=1)
        try:
            found = await registry_of(client, survivor_settings).instances(agent="survivor")
        except REDIS_DOWN:
            return False
        finally:
            await client.aclose()
        return [i.instance for i in found] == ["s1"]

    async with running(Gateway(settings=fast), survivor, sender):
        assert await registered()
        await survivor.update_state(count=1)

        await private_redis.kill()

        await sender.publish("outage.ping", {"n": 1})
        async with asyncio.timeout(10):
            handled = await survivor.pings.get()
        assert handled.payload == {"n": 1}

        with pytest.raises(StateUnavailable, match="unreachable"):
            await survivor.update_state(count=2)
        with pytest.raises(StateUnavailable):
            await survivor.update_state(lambda s: {"count": s.count + 1})
        assert survivor.state.count == 1

        # A fresh, empty Redis on the same port: the heartbeat loop must register anew.
        await private_redis.start()
        await eventually(registered, timeout=15)
        assert (await survivor.update_state(count=3)).count == 3

        await sender.publish("outage.ping", {"n": 2})
        async with asyncio.timeout(10):
            handled = await survivor.pings.get()
        assert handled.payload == {"n": 2}
