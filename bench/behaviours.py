"""How long an agent with many subscriber behaviours takes to start and to stop.

    python bench/behaviours.py [--behaviours 1000] [--queue-type quorum|classic|both]

Runs against a private RabbitMQ that this script starts (``mesh.devservices``) on a free
port, with its open-files limit raised to 65,536 (or the hard limit, if lower) first: a
broker with the default 1,024 cannot hold a queue and a channel per behaviour for a
thousand behaviours (deleting such a vhost wedged one).  Redis is ``MESH_REDIS_URL``, in a
namespace of its own.  The private broker and its data directory are removed at the end.

Prints, per queue type: seconds until every behaviour consumes (``Agent.start``), and seconds
to stop, first with queues to create and again with the queues there (a restart); then the
floor: aio-pika alone doing each behaviour's broker work (a channel with its
prefetch, the queue with the mesh's arguments, two bindings, a consumer), as many at once, and
the broker's CPU seconds meanwhile.  Target (issue 8): 1,000 subscriber behaviours ready in 5 s
or less.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from behaviours import SubscriberBehaviour
from mesh import Agent, Behaviour, Message, Settings, on, topology
from mesh.agent import STARTS_AT_ONCE
from mesh.devservices import ensure_services, stop_services

OPEN_FILES = 65_536
TARGET_SECONDS = 5.0


def handler(n: int) -> Callable[[Behaviour, Message, object], Awaitable[None]]:
    # A function of its own per behaviour: @on records its pattern on the function.
    @on(f"bench.{n}")
    async def handle(self: Behaviour, msg: Message, payload: object) -> None:
        return None

    return handle


def behaviour_classes(count: int, queue_type: str) -> list[type[Behaviour]]:
    return [
        type(
            f"Sub{n}",
            (SubscriberBehaviour,),
            {"name": f"sub{n}", "queue_type": queue_type, "handle": handler(n)},
        )
        for n in range(count)
    ]


async def measure(settings: Settings, count: int, queue_type: str) -> tuple[float, float]:
    cls = type("Many", (Agent,), {"behaviours": behaviour_classes(count, queue_type)})
    agent = cls(f"many-{queue_type}", settings=settings)
    began = time.perf_counter()
    await agent.start()
    started = time.perf_counter() - began
    running = sum(1 for b in agent.behaviour_map.values() if b.is_running)
    assert running == count, f"{running} of {count} behaviours running"
    bindings = {len(b.bindings) for b in agent.behaviour_map.values()}
    assert bindings == {2}, f"each behaviour has one topic and one requeue binding: {bindings}"
    began = time.perf_counter()
    await agent.stop()
    return started, time.perf_counter() - began


def mesh_queue(queue_type: str, n: int) -> str:
    return topology.behaviour_queue(f"many-{queue_type}", f"sub{n}")


def raw_queue(queue_type: str, n: int) -> str:
    return f"raw.{queue_type}.{n}"


async def delete_queues(settings: Settings, names: list[str]) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        await connection.close()


async def raw_floor(settings: Settings, count: int, queue_type: str) -> float:
    """Seconds for aio-pika alone to do what ``count`` behaviours ask of the broker at start."""
    connection = await aio_pika.connect(settings.amqp_url)
    slots = asyncio.Semaphore(STARTS_AT_ONCE)
    arguments = topology.behaviour_queue_args(queue_type, settings.max_queue_length)

    async def one(n: int) -> None:
        async with slots:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=10)
            queue = await channel.declare_queue(
                raw_queue(queue_type, n), durable=True, arguments=arguments
            )
            await queue.bind(topology.TOPIC_EXCHANGE, f"raw.{n}")
            await queue.bind(topology.TOPIC_EXCHANGE, f"raw.again.{n}")
            await queue.consume(lambda incoming: incoming.ack())

    try:
        began = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(count)))
        return time.perf_counter() - began
    finally:
        await connection.close()


def broker_cpu_seconds(port: int) -> float | None:
    """CPU seconds the private broker (the Erlang VM listening on ``port``) has used."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            command = (stat.parent / "cmdline").read_bytes()
            if b"beam" not in command or str(port).encode() not in command:
                continue
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main(count: int, queue_types: list[str]) -> int:
    base = Settings.from_env()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    settings = Settings.from_env(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/",
        redis_url=base.redis_url,
        namespace=namespace,
    )
    # Raised as far as this process may (the hard limit binds unless run with privileges).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    state_dir = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    missed = False
    try:
        print(f"starting a private RabbitMQ (open files {limit}) in {state_dir} ...")
        await asyncio.to_thread(ensure_services, settings, state_dir=state_dir)
        # Each measurement's queues are deleted before the next, so none runs beside them.
        for queue_type in queue_types:
            started, stopped = await measure(settings, count, queue_type)
            missed |= started > TARGET_SECONDS
            print(
                f"{count} {queue_type} subscriber behaviours: ready in {started:.2f} s, "
                f"stopped in {stopped:.2f} s (target: ready in <= {TARGET_SECONDS:g} s)"
            )
            # A restart, as after a deploy: the queues exist, so the broker creates nothing.
            started, stopped = await measure(settings, count, queue_type)
            print(f"  again, queues there: ready in {started:.2f} s, stopped in {stopped:.2f} s")
            await delete_queues(settings, [mesh_queue(queue_type, n) for n in range(count)])
        for queue_type in queue_types:
            before = broker_cpu_seconds(port)
            floor = await raw_floor(settings, count, queue_type)
            after = broker_cpu_seconds(port)
            used = "" if before is None or after is None else f", broker CPU {after - before:.2f} s"
            print(f"  floor, aio-pika alone, {count} {queue_type} queues: {floor:.2f} s{used}")
            await delete_queues(settings, [raw_queue(queue_type, n) for n in range(count)])
    finally:
        await asyncio.to_thread(stop_services, state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        redis = aioredis.from_url(base.redis_url)
        async for key in redis.scan_iter(match=f"{namespace}:*"):
            await redis.unlink(key)
        await redis.aclose()
    return 1 if missed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--behaviours", type=int, default=1000)
    parser.add_argument("--queue-type", choices=("quorum", "classic", "both"), default="both")
    args = parser.parse_args()
    types = ["quorum", "classic"] if args.queue_type == "both" else [args.queue_type]
    sys.exit(asyncio.run(main(args.behaviours, types)))
