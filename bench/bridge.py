"""The bridge under load: REST publishes per second, and websocket fan-out latency.

    python bench/bridge.py [--concurrency 50] [--seconds 10] [--clients 100] [--rate 100]
                           [--fan-seconds 10] [--check]

A mesh provisioned from ``POLICY`` in a vhost and Redis namespace of its own (its broker and
Redis users deleted at the end), the gateway enforcing it and the bridge (``mesh bridge``)
each in an OS process of its own, as their principals' users; the load comes from this
process.

(a) REST: ``--concurrency`` clients, each on a keep-alive HTTP/1.1 connection of its own,
    ``POST /topics/bench.load.<n>`` with a 60-byte JSON body and user ``loader``'s token, one
    request after another, for ``--seconds`` after a 2-second warm-up.  Each answer must be
    202 (the broker confirmed the event).  The client is a few lines over asyncio streams,
    so that it costs the shared CPU little (httpx would cost more than the bridge).
(b) Fan-out: ``--clients`` websocket clients of user ``watcher`` (in a child process: in
    this one their frames would delay the publisher) subscribe to ``bench.fan.#``; agent
    ``bench-pub`` (this process) publishes ``--rate`` events a second for ``--fan-seconds``
    through the gateway, each with its send time; every client records receive time minus
    send time (one clock: the same host).  Delivered/s is the frames all clients received
    divided by the time from the first publish to the last receipt.  For comparison, a
    subscriber behaviour of ``bench-pub`` on a classic queue (as the bridge's stream queue
    is) records the same for the mesh alone.

Targets on this machine (2 cores, shared by the broker, Redis, the gateway, the bridge and
these processes): REST >= 1,000 requests/s; fan-out p99 <= 50 ms at 100 msg/s x 100 clients
(``--check``: exit 1 when one is missed).  Each round prints the CPU each process used as a
share of one core: figures taken while other programs load the machine mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from behaviours import SubscriberBehaviour
from mesh import Agent, Message, Settings, on
from mesh.management import ManagementAPI, vhost_of
from mesh.policy import TokenStore, load_policy
from mesh.provision import CredentialStore, build_plan, mesh_objects, provision
from mesh.testing.isolation import delete_namespace, own_vhost

POLICY = """\
principals:
  gateway: {kind: gateway}
  bridge: {kind: bridge}
  bench: {kind: agent, agents: ["bench-pub"]}
  loader: {kind: user}
  watcher: {kind: user}
rule_sets:
  bench:
    rules:
      - {allow: publish, who: loader, topics: "bench.load.#"}
      - {allow: publish, who: bench, topics: "bench.fan.#"}
      - {allow: subscribe, who: [watcher, bench], topics: "bench.fan.#"}
"""
REST_TARGET = 1000.0
FAN_P99_TARGET_MS = 50.0
WARMUP = 2.0


def say(text: str) -> None:
    print(text, flush=True)


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mesh:
    """The bench's provisioned mesh and its processes."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        self.settings = settings
        self.directory = directory
        self.policy_file = directory / "policy.yaml"
        self.policy_file.write_text(POLICY)
        self.policy = load_policy(self.policy_file)
        self.credentials = CredentialStore(directory / "credentials")
        self.port = free_port()
        self.processes: dict[str, asyncio.subprocess.Process] = {}

    async def provision(self) -> None:
        objects = mesh_objects(self.settings)
        plan = build_plan(self.policy, self.settings.namespace, vhost_of(self.settings),
                          objects=objects)
        redis = aioredis.Redis.from_url(self.settings.redis_url)
        try:
            await provision(plan, self.credentials, self.settings.amqp_url,
                            ManagementAPI.for_settings(self.settings), redis=redis,
                            redis_url=self.settings.redis_url)
        finally:
            await redis.aclose()

    async def delete_users(self) -> None:
        api = ManagementAPI.for_settings(self.settings)
        prefix = f"{self.settings.namespace}."
        for user in await api.users():
            if user.name.startswith(prefix):
                await api.delete_user(user.name)
        redis = aioredis.Redis.from_url(self.settings.redis_url)
        try:
            for name in await redis.acl_users():
                if name.startswith(prefix):
                    await redis.acl_deluser(name)
            await delete_namespace(redis, self.settings.namespace)
        finally:
            await redis.aclose()

    def under(self, principal: str) -> Settings:
        variables = self.credentials.variables(principal)
        return self.settings.model_copy(
            update={
                "amqp_url": variables["MESH_AMQP_URL"],
                "redis_url": variables["MESH_REDIS_URL"],
            }
        )

    def env(self, principal: str) -> dict[str, str]:
        settings = self.under(principal)
        return {
            **os.environ,
            "MESH_AMQP_URL": settings.amqp_url,
            "MESH_REDIS_URL": settings.redis_url,
            "MESH_NAMESPACE": settings.namespace,
            "MESH_POLICY": str(self.policy_file),
        }

    async def start(self, name: str, principal: str, *args: str) -> None:
        log = (self.directory / f"{name}.log").open("wb")
        self.processes[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", *args, "--log-level", "warning",
            env=self.env(principal), stdout=log, stderr=log,
        )

    async def stop(self) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.terminate()
        for name, process in self.processes.items():
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                say(f"{name} did not stop in 15 s: killed")

    async def until_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.returncode is not None:
                    log = (self.directory / f"{name}.log").read_text()[-2000:]
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{log}")
            with contextlib.suppress(OSError, ValueError):
                status, _ = await http_get(self.port, "/ready")
                if status == 200:
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError("the bridge was not ready within a minute")


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        return await read_response(reader)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


# --- (a) REST publishes ------------------------------------------------------------------


async def rest_client(
    port: int, token: str, worker: int, start: float, stop: float, latencies: list[float]
) -> tuple[int, int]:
    """Publish one after another until ``stop``; (answers after ``start``, non-202)."""
    body = json.dumps({"worker": worker, "reading": 42.5, "unit": "kmh", "ok": True}).encode()
    request = (
        f"POST /topics/bench.load.{worker} HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = failed = 0
    try:
        while (now := time.perf_counter()) < stop:
            writer.write(request)
            status, answer = await read_response(reader)
            if now >= start:
                latencies.append(time.perf_counter() - now)
                done += 1
                if status != 202:
                    failed += 1
                    if failed == 1:
                        say(f"  unexpected answer {status}: {answer[:200]!r}")
    finally:
        writer.close()
    return done, failed


async def bench_rest(mesh: Mesh, token: str, concurrency: int, seconds: float) -> float:
    say(f"(a) REST: POST /topics/bench.load.<n>, {concurrency} clients, {seconds:g} s "
        f"after {WARMUP:g} s warm-up")
    latencies: list[float] = []
    begin = time.perf_counter()
    start, stop = begin + WARMUP, begin + WARMUP + seconds
    cpu = CPU(mesh)
    results = await asyncio.gather(
        *(rest_client(mesh.port, token, i, start, stop, latencies) for i in range(concurrency))
    )
    done = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    rate = done / seconds
    say(f"  {rate:,.0f} requests/s ({done:,} in {seconds:g} s, {failed} not 202)")
    say(f"  latency p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms")
    say(f"  {cpu.report()}")
    return rate if failed == 0 else 0.0


def cpu_seconds(mesh: Mesh) -> dict[str, float]:
    """User and system CPU seconds of each child and of this process so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, process in mesh.processes.items():
        if process.returncode is not None:
            continue
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / ticks
    used["bench"] = time.process_time()
    return used


class CPU:
    """CPU each process used between ``start`` and ``report``, as a share of one core."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.began = time.monotonic()
        self.before = cpu_seconds(mesh)

    def report(self) -> str:
        after = cpu_seconds(self.mesh)
        wall = time.monotonic() - self.began
        shares = (
            f"{name} {(after[name] - self.before.get(name, 0.0)) / wall * 100:.0f}%"
            for name in after
        )
        return "CPU (share of one core): " + ", ".join(shares)


# --- (b) websocket fan-out ------------------------------------------------------------------


class Baseline(SubscriberBehaviour):
    """The mesh's own delivery, for comparison: an agent's subscriber on a classic queue
    (as the bridge's stream queue is), recording each event's latency."""

    queue_type = "classic"
    latencies: ClassVar[list[float]] = []

    @on("bench.fan.#")
    async def fan(self, msg: Message, payload: dict[str, Any]) -> None:
        self.latencies.append(time.time() - payload["t"])


class Publisher(Agent):
    behaviours = [Baseline]


async def watcher(
    url: str, count: int, latencies: list[float], received: list[float], ready: asyncio.Event
) -> int:
    """Subscribe, then record each message's latency until ``count`` came; how many did."""
    async with connect(url, max_queue=None, compression=None) as ws:
        await ws.recv()  # welcome
        await ws.send(json.dumps({"op": "subscribe", "id": "s", "topics": ["bench.fan.#"]}))
        while json.loads(await ws.recv())["type"] != "subscribed":
            pass
        ready.set()
        got = 0
        while got < count:
            text = await asyncio.wait_for(ws.recv(), 30)
            now = time.time()
            frame = json.loads(text)
            if frame["type"] == "message":
                latencies.append(now - frame["payload"]["t"])
                received.append(now)
                got += 1
        return got


async def watchers(url: str, clients: int, count: int) -> None:
    """What the ``--watch`` child runs: ``clients`` watchers; it prints ``ready`` once all
    subscribed, then one JSON line of what they received."""
    readies = [asyncio.Event() for _ in range(clients)]
    latencies: list[float] = []
    received: list[float] = []
    tasks = [
        asyncio.create_task(watcher(url, count, latencies, received, readies[i]))
        for i in range(clients)
    ]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
    say("ready")
    counts = await asyncio.gather(*tasks)
    say(json.dumps({"counts": counts, "latencies": latencies, "last": max(received)}))


async def bench_fan_out(
    mesh: Mesh, token: str, clients: int, rate: float, seconds: float
) -> float:
    count = int(rate * seconds)
    say(f"(b) websocket fan-out: {clients} clients on bench.fan.#, {rate:g} msg/s for "
        f"{seconds:g} s ({count} messages, {count * clients:,} frames)")
    # The clients run in a process of their own: in this one, their 10,000 frames a second
    # would delay the publisher and the baseline subscriber.
    url = f"ws://127.0.0.1:{mesh.port}/ws?access_token={token}"
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--watch", url, "--clients", str(clients),
        "--count", str(count), stdout=asyncio.subprocess.PIPE, limit=2**26,
    )
    mesh.processes["clients"] = child
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 60)
    if line.strip() != b"ready":
        raise RuntimeError(f"the clients did not start: {line!r}")
    publisher = Publisher("bench-pub", settings=mesh.under("bench"))
    cpu = CPU(mesh)
    async with publisher:
        began = time.time()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for seq in range(count):
            delay = t0 + seq / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await publisher.publish(f"bench.fan.{seq % 10}", {"seq": seq, "t": time.time()})
        result = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
    counts, latencies = result["counts"], result["latencies"]
    report = cpu.report()
    await child.wait()
    elapsed = result["last"] - began
    delivered = sum(counts) / elapsed
    p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
    say(f"  {delivered:,.0f} messages/s delivered to all ({sum(counts):,} frames in "
        f"{elapsed:.1f} s; every client got {min(counts)}/{count})")
    say(f"  publish to receipt: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max "
        f"{max(latencies) * 1000:.1f} ms")
    mesh_only = Baseline.latencies
    say(f"  the mesh alone (an agent's subscriber, {len(mesh_only)} events): p50 "
        f"{percentile(mesh_only, 0.5) * 1000:.1f} ms, p99 {percentile(mesh_only, 0.99) * 1000:.1f}"
        f" ms, max {max(mesh_only) * 1000:.1f} ms")
    say(f"  {report}")
    return p99 if min(counts) == count else float("inf")


# --- the run ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bench_mesh(directory: Path) -> AsyncIterator[Mesh]:
    base = Settings.from_env()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    async with own_vhost(base, namespace) as settings:
        mesh = Mesh(settings, directory)
        try:
            await mesh.provision()
            await mesh.start("gateway", "gateway", "gateway")
            await mesh.start("bridge", "bridge", "bridge", "--port", str(mesh.port))
            await mesh.until_ready()
            yield mesh
        finally:
            await mesh.stop()
            await mesh.delete_users()


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as temporary:
        async with bench_mesh(Path(temporary)) as mesh:
            tokens = TokenStore.for_policy(mesh.policy)
            rest = p99 = None
            if args.concurrency:
                rest = await bench_rest(
                    mesh, tokens.issue("loader"), args.concurrency, args.seconds
                )
            if args.clients:
                p99 = await bench_fan_out(
                    mesh, tokens.issue("watcher"), args.clients, args.rate, args.fan_seconds
                )
    missed = False
    if rest is not None:
        say(f"REST publish: {rest:,.0f} requests/s (target >= {REST_TARGET:,.0f})")
        missed |= rest < REST_TARGET
    if p99 is not None:
        say(f"fan-out p99: {p99:.1f} ms at {args.rate:g} msg/s x {args.clients} clients "
            f"(target <= {FAN_P99_TARGET_MS:g} ms)")
        missed |= p99 > FAN_P99_TARGET_MS
    return 1 if args.check and missed else 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=50, help="0: no REST round")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=100, help="0: no fan-out round")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--fan-seconds", type=float, default=10.0)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    # The fan-out's clients, in a child process.
    parser.add_argument("--watch", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.watch:
        asyncio.run(watchers(arguments.watch, arguments.clients, arguments.count))
    else:
        sys.exit(asyncio.run(main(arguments)))
