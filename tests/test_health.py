"""The health port (``mesh.health``): ``/healthz``, ``/readyz`` through a start, a drain and
outages of RabbitMQ and Redis, ``/metrics`` after messages were handled, and a ``mesh run``
process with ``MESH_HEALTH_PORT`` drained by SIGTERM during a stream of messages."""

from __future__ import annotations

import asyncio
import signal
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import redis.asyncio as aioredis
from agents_health import GATE, TOPIC, Drained, finished_key, release_key, started_key
from agents_registry import ROOT, mesh_env
from agents_reliability import Hold, drain, peek, subscriber
from helpers import eventually, free_port, running, take
from prometheus_client.parser import text_string_to_metric_families
from proxy import Proxy

from behaviours import SubscriberBehaviour
from mesh import Agent, Message, Settings, on, topology
from mesh.gateway import Gateway
from mesh.health import HealthServer
from mesh.registry import Registry


async def fetch(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """Status and body of ``path`` on the health port, from a plain HTTP client."""

    def request() -> tuple[int, str]:
        url = f"http://127.0.0.1:{port}{path}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    return await asyncio.to_thread(request)


def sample(exposition: str, name: str, **labels: str) -> float:
    """The value of series ``name`` with ``labels`` in a ``/metrics`` body (0 if absent)."""
    for family in text_string_to_metric_families(exposition):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0


@asynccontextmanager
async def health_of(agent: Agent) -> AsyncIterator[int]:
    """``agent``'s health port, on a port of its own; yields the port."""
    server = HealthServer(agent, 0, "127.0.0.1")
    async with server:
        yield server.bound_port


async def ready(port: int) -> bool:
    return await fetch(port, "/readyz") == (200, "ready\n")


async def unready(port: int, reason: str) -> bool:
    return await fetch(port, "/readyz") == (503, f"not ready: {reason}\n")


async def test_liveness_and_readiness_from_start_through_the_drain(settings: Settings) -> None:
    """Not ready before the start, ready after; while a stop drains a handler in flight, not
    ready (and alive); the handler finishes, and its message is acked and counted."""
    held = subscriber(settings, Hold, agent_id="held")
    queue = topology.behaviour_queue("held", Hold.name)
    async with running(Gateway(settings=settings)), peek(settings) as broker:
        async with health_of(held) as port:
            assert await fetch(port, "/healthz") == (200, "ok\n")
            assert await unready(port, "starting")
            assert (await fetch(port, "/nothing"))[0] == 404
            assert (await fetch(port, "/healthz", method="POST"))[0] == 405

            await held.start()
            assert await ready(port)

            message_id = await held.publish("hold.item", {})
            assert await take(held.seen, 1) == [("started", message_id)]
            stopping = asyncio.create_task(held.stop())
            try:
                await eventually(lambda: unready(port, "draining"))
                assert await fetch(port, "/healthz") == (200, "ok\n")
                assert not stopping.done()
                held.release.set()
                await asyncio.wait_for(stopping, 30)
            finally:
                stopping.cancel()
            assert drain(held.seen) == [("finished", message_id)]
            assert await unready(port, "draining")
            _, exposition = await fetch(port, "/metrics")
        assert await broker.depth(queue) == 0
    assert sample(exposition, "mesh_messages_total", behaviour="hold", outcome="handled") == 1
    assert sample(exposition, "mesh_handler_seconds_count", behaviour="hold") == 1


class Flaky(SubscriberBehaviour):
    """Fails the messages that say so, twice: the second failure dead-letters them."""

    max_deliveries = 2
    retry_delays = (0.05,)

    @on("flaky.item")
    async def item(self, msg: Message, payload: dict[str, bool]) -> None:
        if not payload["ok"]:
            raise RuntimeError("failing as the test asked")


class FlakyAgent(Agent):
    behaviours = [Flaky]


async def test_metrics_count_outcomes_confirms_and_gateway_decisions(settings: Settings) -> None:
    """An agent's /metrics counts its deliveries by outcome, their handling time and its
    confirmed publishes; a gateway's counts what its pipeline passed and denied, by stage."""
    gateway = Gateway(settings=settings)
    agent = FlakyAgent("flaky", settings=settings)
    async with (
        running(gateway, agent),
        peek(settings) as broker,
        health_of(agent) as port,
        health_of(gateway) as gateway_port,
    ):
        for ok in (True, True, True, False):
            await agent.publish("flaky.item", {"ok": ok})
        await broker.publish_raw("flaky.item", aio_pika.Message(b"{}"))  # no message id

        async def counted() -> str:
            _, exposition = await fetch(port, "/metrics")
            by_outcome = {
                outcome: sample(
                    exposition, "mesh_messages_total", behaviour="flaky", outcome=outcome
                )
                for outcome in ("handled", "failed", "dead_lettered", "skipped", "deferred")
            }
            assert by_outcome == {
                "handled": 3, "failed": 1, "dead_lettered": 1, "skipped": 0, "deferred": 0
            }
            return exposition

        exposition = await eventually(counted)
        assert sample(exposition, "mesh_handler_seconds_count", behaviour="flaky") == 5
        assert sample(exposition, "mesh_publish_confirms_total", result="ok") >= 4
        assert sample(exposition, "mesh_publish_confirms_total", result="failed") == 0
        assert "mesh_gateway_decisions" not in exposition

        async def decided() -> str:
            _, exposition = await fetch(gateway_port, "/metrics")
            denied = sample(
                exposition, "mesh_gateway_decisions_total", stage="decode", outcome="denied"
            )
            assert denied == 1
            return exposition

        exposition = await eventually(decided)
        passed = sample(
            exposition, "mesh_gateway_decisions_total", stage="pipeline", outcome="passed"
        )
        assert passed >= 4


async def test_not_ready_while_rabbitmq_is_down(settings: Settings) -> None:
    """Cut off from RabbitMQ, an agent is alive and not ready; once it reconnected it is
    ready again, and /metrics counts the reconnects of its two connections."""
    async with Proxy.for_url(settings.amqp_url) as proxy:
        behind = settings.model_copy(update={"amqp_url": proxy.url_for(settings.amqp_url)})
        agent = subscriber(behind, Hold, agent_id="cut")
        async with running(agent), health_of(agent) as port:
            assert await ready(port)
            proxy.refuse_clients()
            proxy.drop_clients()
            await eventually(lambda: unready(port, "RabbitMQ unreachable: reconnecting"))
            assert await fetch(port, "/healthz") == (200, "ok\n")
            proxy.accept_clients()
            await eventually(lambda: ready(port), timeout=30)
            _, exposition = await fetch(port, "/metrics")
    assert sample(exposition, "mesh_reconnects_total", connection="consuming") == 1
    assert sample(exposition, "mesh_reconnects_total", connection="publishing") == 1


async def test_a_stop_while_rabbitmq_is_down_ends_within_the_drain_timeout(
    settings: Settings,
) -> None:
    """With RabbitMQ gone, a stopping agent does not wait for it: the consumer's cancel and
    the leave event give up within ``shutdown_timeout``, and the stop ends (it waited for
    the broker to come back before)."""
    quick = settings.model_copy(update={"shutdown_timeout": 0.5})
    async with Proxy.for_url(settings.amqp_url) as proxy:
        behind = quick.model_copy(update={"amqp_url": proxy.url_for(settings.amqp_url)})
        agent = subscriber(behind, Hold, agent_id="cut")
        async with health_of(agent) as port:
            await agent.start()
            proxy.refuse_clients()
            proxy.drop_clients()
            await eventually(lambda: unready(port, "RabbitMQ unreachable: reconnecting"))
            stopping = asyncio.create_task(agent.stop())
            try:
                await eventually(lambda: unready(port, "draining"))
                await asyncio.wait_for(stopping, 30)
            finally:
                stopping.cancel()


async def test_not_ready_while_redis_is_down(settings: Settings) -> None:
    """Cut off from Redis (its heartbeat fails), an agent is not ready; once a heartbeat
    gets through again it is."""
    fast = settings.model_copy(update={"heartbeat_interval": 0.2, "heartbeat_ttl": 1.0})
    async with Proxy.for_url(settings.redis_url) as proxy:
        behind = fast.model_copy(update={"redis_url": proxy.url_for(settings.redis_url)})
        agent = subscriber(behind, Hold, agent_id="cut")
        async with running(agent), health_of(agent) as port:
            assert await ready(port)
            proxy.refuse_clients()
            proxy.drop_clients()
            await eventually(lambda: unready(port, "Redis unreachable"))
            assert await fetch(port, "/healthz") == (200, "ok\n")
            proxy.accept_clients()
            await eventually(lambda: ready(port))


# --- a mesh run process and SIGTERM ---------------------------------------------------------

COUNT = 300


@asynccontextmanager
async def mesh_run_drained(
    settings: Settings, port: int, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``mesh run tests.agents_health:Drained --id drained`` with its health port on ``port``."""
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "run", "tests.agents_health:Drained",
            "--id", "drained", "--instance", "d1",
            cwd=ROOT,
            env=mesh_env(settings, MESH_HEALTH_PORT=str(port), MESH_HEALTH_HOST="127.0.0.1"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_mesh_run_drains_on_sigterm_during_a_stream_and_exits_0(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """SIGTERM while messages stream in: the process turns not ready, finishes and acks
    what its handlers hold (one of them until the test releases it), deregisters and exits
    0; another instance handles the rest, and no message is lost or handled twice."""
    namespace = settings.namespace
    port, log = free_port(), tmp_path / "drained.log"
    feeder = Agent("feeder", settings=settings)
    sent: list[str] = []

    async def items(key: str) -> list[str]:
        return [item.decode() for item in await redis.lrange(key, 0, -1)]

    async def stream() -> None:
        for n in range(COUNT):
            sent.append(await feeder.publish(TOPIC, {"n": n}))

    async with running(Gateway(settings=settings), feeder):
        async with mesh_run_drained(settings, port, log) as process:

            async def up() -> bool:
                if process.returncode is not None:
                    raise RuntimeError(f"mesh run exited:\n{log.read_text()}")
                try:
                    return await ready(port)
                except OSError:  # not listening yet
                    return False

            await eventually(up, timeout=30)
            streaming = asyncio.create_task(stream())
            try:
                await eventually(
                    lambda: len(sent) > GATE and redis.lpos(started_key(namespace), sent[GATE]),
                    timeout=30,
                )
                process.send_signal(signal.SIGTERM)
                await eventually(lambda: unready(port, "draining"))
                _, exposition = await fetch(port, "/metrics")
                assert process.returncode is None
                await redis.set(release_key(namespace), 1)
                code = await asyncio.wait_for(process.wait(), 60)
                await asyncio.wait_for(streaming, 60)
            finally:
                streaming.cancel()
        assert code == 0, log.read_text()
        assert sample(exposition, "mesh_messages_total", behaviour="work", outcome="handled") > 0
        by_process = await items(started_key(namespace))
        # Whatever it started it finished (and acked: none of it is handled again below).
        assert Counter(await items(finished_key(namespace))) == Counter(by_process)
        assert sent[GATE] in by_process
        registry = Registry(redis, namespace, settings.heartbeat_ttl)
        assert await registry.instances(agent="drained") == []

        async with running(Drained("drained", settings=settings, instance="d2")):

            async def all_finished() -> bool:
                return set(await items(finished_key(namespace))) >= set(sent)

            await eventually(all_finished, timeout=30)
    assert len(sent) == COUNT
    assert Counter(await items(started_key(namespace))) == Counter(sent)
    assert Counter(await items(finished_key(namespace))) == Counter(sent)
