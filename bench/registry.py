"""Registry discovery latency and state update throughput against a real Redis.

    python bench/registry.py [--agents 1000] [--instances 3] [--iterations 500]

Uses ``MESH_REDIS_URL`` (default the local Redis) and a namespace of its own, deleted at the end.
While discovery is measured, a separate process heartbeats every instance each
``--heartbeat-interval`` seconds, as a live mesh would (0 turns that off).
Target: discovery p99 <= 5 ms with 1,000 agents x 3 instances. Latencies are wall-clock per call;
"cpu" is this process's CPU time per call (the client's share, unaffected by scheduling noise).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sized
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis
from pydantic import BaseModel

from mesh.config import Settings
from mesh.registry import AgentRecord, BehaviourRecord, InstanceRecord, Registry
from mesh.state import StateStore

CAPABILITIES = [f"cap-{i:02d}" for i in range(50)]
METRICS = [f"m{i:02d}" for i in range(20)]
REGIONS = [f"r{i}" for i in range(10)]
TARGET_MS = 5.0
LEASE = 60.0


class Counter(BaseModel):
    count: int = 0


def make_record(rng: random.Random, agent: str, instance: str, caps: list[str]) -> InstanceRecord:
    """An instance with four behaviours: literal, per-agent and shared wildcard bindings."""
    metrics = rng.sample(METRICS, 2)
    behaviours = [
        BehaviourRecord(name="report", kind="PeriodicBehaviour", state="running"),
        BehaviourRecord(
            name="cmd",
            kind="SubscriberBehaviour",
            state="running",
            binding_keys=[f"vehicle.{agent}.cmd", f"vehicle.{agent}.*"],
        ),
        BehaviourRecord(
            name="watch",
            kind="SubscriberBehaviour",
            state="running",
            binding_keys=[f"vehicle.*.{m}" for m in metrics] + [f"fleet.{rng.choice(REGIONS)}.#"],
        ),
        BehaviourRecord(name="boot", kind="OneShotBehaviour", state="done", exit_code=0),
    ]
    if rng.random() < 0.005:
        behaviours.append(
            BehaviourRecord(
                name="tap", kind="SubscriberBehaviour", state="running", binding_keys=["#"]
            )
        )
    return InstanceRecord(
        agent=agent,
        instance=instance,
        capabilities=caps,
        metadata={"zone": rng.choice(REGIONS), "model": f"m-{rng.randrange(100)}"},
        behaviours=behaviours,
        host=f"node-{rng.randrange(50)}",
        pid=rng.randrange(1, 65536),
        version="1.0.0",
    )


def members(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [(f"agent-{a:04d}", f"i{n}") for a in range(args.agents) for n in range(args.instances)]


async def timed(
    name: str,
    iterations: int,
    call: Callable[[int], Awaitable[object]],
    *,
    target: bool = True,
) -> None:
    samples: list[float] = []
    sizes: list[int] = []
    cpu = time.process_time()
    for i in range(iterations):
        start = time.perf_counter()
        result = await call(i)
        samples.append((time.perf_counter() - start) * 1000)
        if isinstance(result, AgentRecord):
            sizes.append(len(result.instances))
        elif isinstance(result, Sized):
            sizes.append(len(result))
    cpu_ms = (time.process_time() - cpu) * 1000 / iterations
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    found = f"{statistics.mean(sizes):6.1f}" if sizes else "     -"
    verdict = "" if not target else "ok" if p99 <= TARGET_MS else "over target"
    print(
        f"  {name:<37} p50 {p50:6.2f}  p99 {p99:6.2f}  max {samples[-1]:6.2f}  cpu {cpu_ms:5.2f} ms"
        f"  hits {found}  {verdict}"
    )


async def throughput(writers: int, per_writer: int, url: str, namespace: str) -> None:
    clients = [aioredis.Redis.from_url(url) for _ in range(writers)]
    stores = [StateStore(c, namespace) for c in clients]
    key = stores[0].key("bench", f"w{writers}")

    async def write(store: StateStore) -> None:
        # Each writer keeps the value it last wrote, as an agent's state slot does.
        current = await store.load(key, Counter)
        for _ in range(per_writer):
            current = await store.update(
                key, Counter, lambda c: {"count": c.count + 1}, current=current
            )

    start = time.perf_counter()
    await asyncio.gather(*(write(s) for s in stores))
    elapsed = time.perf_counter() - start
    final = await stores[0].load(key, Counter)
    assert final.value.count == writers * per_writer, final
    total = writers * per_writer
    print(
        f"  state update, {writers} concurrent writer{'s' if writers > 1 else ' '}"
        f"     {total / elapsed:8.0f} updates/s  ({total} updates, final count {final.value.count})"
    )
    for c in clients:
        await c.aclose()


async def churn(args: argparse.Namespace) -> None:
    """Heartbeat every instance once per interval, spread evenly (run as a child process)."""
    client = aioredis.Redis.from_url(Settings.from_env().redis_url)
    registry = Registry(client, args.churn, ttl=LEASE)
    everyone = members(args)
    step = 0.01
    per_step = max(1, round(len(everyone) * step / args.heartbeat_interval))
    i = 0
    while True:
        started = time.perf_counter()
        batch = [everyone[(i + k) % len(everyone)] for k in range(per_step)]
        i += per_step
        await asyncio.gather(*(registry.heartbeat(a, n) for a, n in batch))
        await asyncio.sleep(max(0.0, step - (time.perf_counter() - started)))


async def discovery(registry: Registry, args: argparse.Namespace, rng: random.Random) -> None:
    agents = [f"agent-{a:04d}" for a in range(args.agents)]
    n = args.iterations
    await timed(
        "instances(capability=c)",
        n,
        lambda i: registry.instances(capability=CAPABILITIES[i % len(CAPABILITIES)]),
    )
    await timed("agent(id)", n, lambda i: registry.agent(rng.choice(agents)))
    await timed("instances(agent=a)", n, lambda i: registry.instances(agent=rng.choice(agents)))
    await timed(
        "instances(agent=a, capability=c)",
        n,
        lambda i: registry.instances(agent=rng.choice(agents), capability=CAPABILITIES[0]),
    )
    await timed(
        "instances(topic=vehicle.<agent>.cmd)",
        n,
        lambda i: registry.instances(topic=f"vehicle.{rng.choice(agents)}.cmd"),
    )
    await timed(
        "instances(topic=fleet.<region>.x.y)",
        n,
        lambda i: registry.instances(topic=f"fleet.{rng.choice(REGIONS)}.x.y"),
    )
    await timed(
        "receivers(vehicle.<agent>.<metric>)",
        n,
        lambda i: registry.receivers(f"vehicle.{rng.choice(agents)}.{rng.choice(METRICS)}"),
    )


async def main(args: argparse.Namespace) -> None:
    url = Settings.from_env().redis_url
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(url)
    registry = Registry(client, namespace, ttl=LEASE)
    rng = random.Random(7)
    everyone = members(args)
    child: asyncio.subprocess.Process | None = None
    try:
        caps: dict[str, list[str]] = {}
        start = time.perf_counter()
        for batch in range(0, len(everyone), 50):
            records = [
                make_record(rng, a, n, caps.setdefault(a, rng.sample(CAPABILITIES, 3)))
                for a, n in everyone[batch : batch + 50]
            ]
            await asyncio.gather(*(registry.register(r) for r in records))
        elapsed = time.perf_counter() - start
        print(
            f"registered {len(everyone)} instances of {args.agents} agents in {elapsed:.2f} s "
            f"({len(everyone) / elapsed:.0f}/s); redis {url.rsplit('@', 1)[-1]}"
        )
        # What the gateway does when each instance's join event passes.
        start = time.perf_counter()
        for batch in range(0, len(everyone), 50):
            await asyncio.gather(*(registry.index(a, n) for a, n in everyone[batch : batch + 50]))
        elapsed = time.perf_counter() - start
        print(f"indexed them in {elapsed:.2f} s ({len(everyone) / elapsed:.0f}/s)")
        await timed(
            "heartbeat",
            args.iterations,
            lambda i: registry.heartbeat(*everyone[i % len(everyone)]),
        )

        if args.heartbeat_interval > 0:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--churn",
                namespace,
                "--agents",
                str(args.agents),
                "--instances",
                str(args.instances),
                "--heartbeat-interval",
                str(args.heartbeat_interval),
            )
            print(
                f"discovery, first pass (parses every record once), while another process "
                f"heartbeats each instance every {args.heartbeat_interval:g} s:"
            )
        else:
            print("discovery, first pass (parses every record once), no heartbeats:")
        await discovery(registry, args, rng)
        print("discovery, second pass:")
        await discovery(registry, args, rng)
        print("informational, no target: every live instance")
        await timed(
            "instances()",
            max(20, args.iterations // 10),
            lambda i: registry.instances(),
            target=False,
        )
        if child is not None:
            child.terminate()
            await child.wait()
            child = None

        print("state (compare-and-set, each writer passing the value it last wrote):")
        await throughput(1, args.updates, url, namespace)
        await throughput(2, args.updates, url, namespace)
    finally:
        if child is not None:
            child.terminate()
            await child.wait()
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        for batch in range(0, len(keys), 1000):
            await client.unlink(*keys[batch : batch + 1000])
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--updates", type=int, default=2000, help="state updates per writer")
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=Settings().heartbeat_interval,
        help="seconds between heartbeats of each instance while measuring discovery (0: none)",
    )
    parser.add_argument("--churn", metavar="NAMESPACE", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    asyncio.run(churn(parsed) if parsed.churn else main(parsed))
