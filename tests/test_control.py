"""Control commands over the mesh: ping, start/stop a behaviour, shutdown, and ``mesh ping``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from agents_core import Recorder, recorder
from helpers import eventually, mesh_cli, running

from behaviours import OneShotBehaviour, PeriodicBehaviour, SubscriberBehaviour
from mesh import BehaviourStatus, Client, InstanceRecord, Message, MessageType, Settings, on
from mesh.gateway import Gateway

ROOT = Path(__file__).resolve().parent.parent


class Listen(SubscriberBehaviour):
    @on("control.#")
    async def heard(self, msg: Message, payload: object) -> None:
        recorder(self).received.put_nowait((self.name, msg))


class Finish(OneShotBehaviour):
    async def run(self) -> int:
        return 5


class Alpha(Recorder):
    capabilities = ["listening"]
    behaviours = [Listen, Finish]


class Beat(PeriodicBehaviour):
    period = 60.0
    delay = 60.0

    async def tick(self) -> None:
        """Never due during a test; the behaviour just runs."""


class Beta(Recorder):
    capabilities = ["beating"]
    behaviours = [Beat]


def behaviours_of(record: InstanceRecord) -> dict[str, tuple[str, str, int | None]]:
    return {b.name: (b.kind, b.state, b.exit_code) for b in record.behaviours}


async def test_ping_lists_every_instance_with_behaviours(settings: Settings) -> None:
    """Pinging all agents lists each running instance with its capabilities, behaviours,
    their states and exit codes; pinging one agent id lists only its instances."""
    alphas = [Alpha("alpha", settings=settings, instance=f"a{i}") for i in (1, 2)]
    beta = Beta("beta", settings=settings, instance="b1")
    client = Client(settings=settings)
    async with running(Gateway(settings=settings, instance="g1"), *alphas, beta, client):
        for alpha in alphas:
            assert await asyncio.wait_for(alpha.behaviour("finish").wait(), 5) == 5

        records = await client.ping(timeout=5)
        assert [(r.agent, r.instance) for r in records] == [
            ("alpha", "a1"), ("alpha", "a2"), ("beta", "b1"), ("gateway", "g1"),
        ]
        by_instance = {r.instance: r for r in records}
        for instance in ("a1", "a2"):
            record = by_instance[instance]
            assert record.capabilities == ["listening"]
            assert behaviours_of(record) == {
                "listen": ("subscriber", "running", None),
                "finish": ("oneshot", "done", 5),
            }
            [listen] = [b for b in record.behaviours if b.name == "listen"]
            assert listen.binding_keys == ["control.#"]
            assert record.pid == os.getpid()
        assert behaviours_of(by_instance["b1"]) == {"beat": ("periodic", "running", None)}
        assert by_instance["g1"].capabilities == ["gateway"]

        only_beta = await client.ping("beta", timeout=5)
        assert [(r.agent, r.instance) for r in only_beta] == [("beta", "b1")]
        assert await client.ping("nobody", timeout=0.3) == []


async def test_stop_and_start_behaviour_by_control(settings: Settings) -> None:
    """``stop_behaviour``/``start_behaviour`` change the behaviour on every instance, as a
    following ping shows; an unknown behaviour gets an error reply naming it."""
    alphas = [Alpha("alpha", settings=settings, instance=f"a{i}") for i in (1, 2)]
    client = Client(settings=settings)
    async with running(Gateway(settings=settings), *alphas, client):

        async def listen_states() -> list[str]:
            records = await client.ping("alpha", timeout=5)
            assert len(records) == 2
            return [
                b.state for r in records for b in r.behaviours if b.name == "listen"
            ]

        assert await listen_states() == ["running", "running"]

        replies = await client.control(
            "alpha", "stop_behaviour", {"behaviour": "listen"}, timeout=5
        )
        assert sorted(r.instance or "" for r in replies) == ["a1", "a2"]
        assert {r.type for r in replies} == {MessageType.REPLY}
        assert {r.payload["state"] for r in replies} == {"stopped"}
        assert all(a.behaviour("listen").status is BehaviourStatus.STOPPED for a in alphas)
        assert await listen_states() == ["stopped", "stopped"]

        replies = await client.control(
            "alpha", "start_behaviour", {"behaviour": "listen"}, timeout=5
        )
        assert {r.payload["state"] for r in replies} == {"running"}
        assert await listen_states() == ["running", "running"]
        # Running again for real: a message reaches one of the instances.
        await client.publish("control.hello", {})
        [receiver] = await eventually(lambda: [a for a in alphas if not a.received.empty()])
        _, heard = receiver.received.get_nowait()
        assert heard.topic == "control.hello"

        replies = await client.control(
            "alpha", "stop_behaviour", {"behaviour": "nope"}, timeout=5
        )
        assert len(replies) == 2
        for reply in replies:
            assert reply.type is MessageType.ERROR
            assert reply.payload["type"] == "KeyError"
            assert "no behaviour 'nope'" in reply.payload["error"]
        assert await listen_states() == ["running", "running"]


async def test_shutdown_by_control_stops_the_agent(settings: Settings) -> None:
    """``shutdown`` makes the remote agent stop; the other agents keep running."""
    alpha = Alpha("alpha", settings=settings, instance="a1")
    beta = Beta("beta", settings=settings, instance="b1")
    client = Client(settings=settings)
    async with running(Gateway(settings=settings, instance="g1"), alpha, beta, client):
        [reply] = await client.control("beta", "shutdown", timeout=5)
        assert reply.type is MessageType.REPLY
        assert reply.payload == {"agent": "beta", "instance": "b1", "shutting_down": True}

        await asyncio.wait_for(beta.wait_until_stopped(), 10)
        assert beta.should_stop
        assert beta.behaviour("beat").status is BehaviourStatus.STOPPED

        records = await client.ping(timeout=2)
        assert [(r.agent, r.instance) for r in records] == [("alpha", "a1"), ("gateway", "g1")]
        assert not alpha.should_stop


async def test_cli_ping_json(settings: Settings) -> None:
    """``python -m mesh.cli ping --json`` lists the running agents as JSON."""
    alpha = Alpha("alpha", settings=settings, instance="a1")
    async with running(Gateway(settings=settings, instance="g1"), alpha):
        await asyncio.wait_for(alpha.behaviour("finish").wait(), 5)
        env = {
            **os.environ,
            "MESH_AMQP_URL": settings.amqp_url,
            "MESH_REDIS_URL": settings.redis_url,
            "MESH_NAMESPACE": settings.namespace,
            "PYTHONPATH": str(ROOT),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "ping", "--json", "--timeout", "5",
            env=env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, stderr.decode()

    answers = json.loads(stdout)
    records = [InstanceRecord.model_validate(a) for a in answers]
    assert [(r.agent, r.instance) for r in records] == [("alpha", "a1"), ("gateway", "g1")]
    [alpha_record] = [r for r in records if r.agent == "alpha"]
    assert behaviours_of(alpha_record) == {
        "listen": ("subscriber", "running", None),
        "finish": ("oneshot", "done", 5),
    }
    assert alpha_record.pid == os.getpid()


async def test_cli_names_an_unknown_behaviour_in_words(settings: Settings) -> None:
    """``mesh behaviour stop`` prints the agent's error as text, not a Python dict."""
    alpha = Alpha("alpha", settings=settings, instance="a1")
    async with running(Gateway(settings=settings), alpha):
        code, out, err = await mesh_cli(settings, "behaviour", "stop", "alpha", "nope")
    assert code == 1, (out, err)
    [line] = err.splitlines()
    assert line.startswith("alpha/a1: KeyError: agent alpha has no behaviour 'nope'"), line


async def test_mesh_shutdown_all_stops_every_agent_but_the_gateway(settings: Settings) -> None:
    """``mesh shutdown _all`` reaches every agent's instances; gateways take no command sent
    to all, so the mesh can still be driven afterwards."""
    gateway = Gateway(settings=settings)
    first = Recorder("first", settings=settings)
    second = Recorder("second", settings=settings)
    async with running(gateway, first, second):
        code, out, err = await mesh_cli(settings, "shutdown", "_all", "--timeout", "5")
        assert code == 0, err
        assert sorted(line.split("/")[0] for line in out.splitlines()) == ["first", "second"]
        await asyncio.wait_for(first.wait_until_stopped(), 15)
        await asyncio.wait_for(second.wait_until_stopped(), 15)
        assert not gateway.should_stop
        client = Client(settings=settings)
        async with running(client):
            assert [r.agent for r in await client.ping("gateway", timeout=5)] == ["gateway"]
