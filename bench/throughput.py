"""Mesh throughput and request/reply latency against raw aio-pika, on the same broker.

    python bench/throughput.py [--count 20000] [--warmup 2000] [--rounds 4] [--in-flight 100]
                               [--raw-prefetch 100] [--requests 1000] [--check]

One run measures, every party in an OS process of its own:

(a) raw aio-pika: a publisher process (confirm channel, ``--in-flight`` publishes awaiting
    their confirm at once) -> a topic exchange -> a quorum queue (the mesh's behaviour queues
    are quorum queues) -> a consumer process (manual ack per message, prefetch
    ``--raw-prefetch``);
(b) the mesh: the ``Blast`` behaviour of ``PublisherAgent`` (``--in-flight`` concurrent
    ``self.publish``) -> ``mesh.policy`` -> the gateway (``python -m mesh.cli gateway``) ->
    ``mesh.topic`` -> the ``Sink`` subscriber behaviour of ``SubscriberAgent`` (default
    mailbox and concurrency); both agents run as ``python -m mesh.cli run
    bench.throughput:...``.  The gateway runs at log level WARNING, then once more at INFO
    (its per-message audit log on, as in production, written to a file);
(c) request/reply round trips through the gateway: ``--requests`` sequential
    ``agent.request`` calls to an ``@rpc`` of the subscriber agent.

Throughput is what the consumer received after the warm-up, divided by the time from the
warm-up's last message to the last one.  (a) and (b) alternate in ``--rounds`` rounds of
``count / rounds`` messages (after ``warmup / rounds`` each) so that load from other programs
weighs on both alike; each figure is the total over its rounds.  The last line is
``mesh/raw ratio: R (mesh X msg/s, raw Y msg/s)`` (the mesh with the audit log off).
Targets on a 2-core machine: R >= 0.45 and request/reply p50 <= 3 ms (``--check``: exit 1
when one is missed).

Uses ``MESH_AMQP_URL`` for the broker's host and credentials, in a vhost of its own that it
creates and deletes (``mesh.devservices.BrokerAdmin``, else ``rabbitmqctl``), and a Redis
namespace of its own; child processes, vhost and namespace go away on success, failure and
Ctrl+C alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aio_pika

from behaviours import OneShotBehaviour, SubscriberBehaviour
from mesh import (
    Agent,
    AgentStopped,
    Client,
    Message,
    PublishError,
    RemoteError,
    RequestTimeout,
    on,
    rpc,
)
from mesh.config import DEFAULT_AMQP_URL, Settings

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "bench.v7.reading"
PUBLISHER_ID = "bench-pub"
SUBSCRIBER_ID = "bench-sub"
RAW_EXCHANGE = "bench.raw"
RAW_QUEUE = "bench.raw"
BODY_BYTES = 200
TARGET_RATIO = 0.45
TARGET_P50_MS = 3.0


# --- the message -----------------------------------------------------------------------------


def payload(seq: int) -> dict[str, Any]:
    """A ~200-byte JSON reading, the same on both paths."""
    reading: dict[str, Any] = {
        "vehicle": "v7",
        "seq": seq,
        "speed_kmh": 88.4,
        "heading": 271.5,
        "lat": 48.137154,
        "lon": 11.576124,
        "ts": 1_700_000_000.123,
        "note": "",
    }
    pad = BODY_BYTES - len(json.dumps(reading, separators=(",", ":"))) - 5  # room for seq
    reading["note"] = "x" * max(pad, 0)
    return reading


def body(seq: int) -> bytes:
    return json.dumps(payload(seq), separators=(",", ":")).encode()


# --- (b) the mesh agents, run by ``mesh run bench.throughput:...`` ---------------------------


class Blast(OneShotBehaviour):
    """Publishes the agent's ``plan``: ``total`` readings, ``in_flight`` awaiting confirms."""

    autostart = False

    async def run(self) -> int | None:
        agent = self.agent
        assert isinstance(agent, PublisherAgent)
        total, in_flight = agent.plan["total"], agent.plan["in_flight"]
        next_seq = 0
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal next_seq
            while next_seq < total:
                seq = next_seq
                next_seq += 1
                await self.publish(TOPIC, payload(seq))

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        agent.last_blast = {"published": total, "seconds": time.perf_counter() - started}
        return 0


class PublisherAgent(Agent):
    behaviours = [Blast]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan: dict[str, int] = {"total": 0, "in_flight": 1}
        self.last_blast: dict[str, Any] = {}

    @rpc("plan")
    async def set_plan(self, msg: Message, plan: Any) -> dict[str, int]:
        self.plan = {"total": int(plan["total"]), "in_flight": int(plan["in_flight"])}
        self.last_blast = {}
        return self.plan

    @rpc("stats")
    async def stats(self, msg: Message, _: Any) -> dict[str, Any]:
        return self.last_blast


class Sink(SubscriberBehaviour):
    """Counts readings (what a real subscriber does besides: nothing)."""

    @on("bench.#")
    async def reading(self, msg: Message, _: Any) -> None:
        agent = self.agent
        assert isinstance(agent, SubscriberAgent)
        agent.count_one()


class SubscriberAgent(Agent):
    behaviours = [Sink]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._expect(0, 0)

    def _expect(self, warmup: int, count: int) -> None:
        self.warmup, self.count = warmup, count
        self.received = 0
        self.t_warm = self.t_last = 0.0
        self.done = asyncio.Event()

    def count_one(self) -> None:
        self.received += 1
        if self.received == self.warmup:
            self.t_warm = time.perf_counter()
        if self.received == self.warmup + self.count:
            self.t_last = time.perf_counter()
            self.done.set()

    async def on_stop(self) -> None:
        self.done.set()  # a waiting ``result`` answers now instead of holding up the stop
        await super().on_stop()

    @rpc("expect")
    async def expect(self, msg: Message, args: Any) -> dict[str, int]:
        self._expect(int(args["warmup"]), int(args["count"]))
        return {"warmup": self.warmup, "count": self.count}

    @rpc("result")
    async def result(self, msg: Message, args: Any) -> dict[str, Any]:
        """Wait (up to ``args['timeout']`` s) for warm-up + count readings; the figures."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), float(args.get("timeout", 60)))
        complete = self.received >= self.warmup + self.count
        return {
            "received": self.received,
            "complete": complete,
            "seconds": self.t_last - self.t_warm if complete else 0.0,
        }

    @rpc("echo")
    async def echo(self, msg: Message, args: Any) -> Any:
        return args


# --- (a) raw aio-pika, each side in a process of its own -------------------------------------


async def raw_consumer(
    url: str, queue_name: str, warmup: int, count: int, prefetch: int, timeout: float
) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        exchange = await channel.declare_exchange(
            RAW_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, "bench.#")
        done = asyncio.Event()
        received = 0
        t_warm = t_last = 0.0
        total = warmup + count

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received, t_warm, t_last
            json.loads(message.body)  # what any consumer does with it
            await message.ack()
            received += 1
            if received == warmup:
                t_warm = time.perf_counter()
            if received == total:
                t_last = time.perf_counter()
                done.set()

        await queue.consume(on_message)
        print("ready", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
        print(
            json.dumps(
                {"received": received, "complete": done.is_set(), "seconds": t_last - t_warm}
            ),
            flush=True,
        )
    finally:
        await connection.close()


async def raw_publisher(url: str, total: int, in_flight: int) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            RAW_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        next_seq = 0
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal next_seq
            while next_seq < total:
                seq = next_seq
                next_seq += 1
                message = aio_pika.Message(
                    body(seq),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=uuid.uuid4().hex,
                    type="event",
                )
                await exchange.publish(message, TOPIC)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        print(
            json.dumps({"published": total, "seconds": time.perf_counter() - started}), flush=True
        )
    finally:
        await connection.close()


# --- the orchestrator ------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


@dataclass
class Figures:
    """Messages and seconds, summed over rounds."""

    messages: int = 0
    seconds: float = 0.0
    published: int = 0
    publish_seconds: float = 0.0
    rounds: list[float] = field(default_factory=list)

    def add(
        self, messages: int, seconds: float, published: int = 0, publish_seconds: float = 0.0
    ) -> None:
        self.messages += messages
        self.seconds += seconds
        self.published += published
        self.publish_seconds += publish_seconds
        self.rounds.append(messages / seconds)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def publish_rate(self) -> float:
        return self.published / self.publish_seconds if self.publish_seconds > 0 else 0.0

    def detail(self) -> str:
        rounds = ", ".join(f"{r:,.0f}" for r in self.rounds)
        return f"rounds {rounds}; publisher confirmed {self.publish_rate:,.0f} msg/s"


def vhost_url(base: str, vhost: str) -> str:
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe=""), fragment=""))


class Vhost:
    """The benchmark's own vhost: ``mesh.devservices.BrokerAdmin``, else plain ``rabbitmqctl``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.name = f"bench-{uuid.uuid4().hex[:8]}"
        self.created = False
        self._admin: Any = None

    async def create(self) -> None:
        try:
            from mesh.devservices import BrokerAdmin
        except ImportError:
            self._admin = None
        else:
            try:
                self._admin = BrokerAdmin.for_settings(Settings.from_env(amqp_url=self.base_url))
            except Exception as exc:  # DevServicesError says what is wrong
                raise BenchError(f"cannot administer the broker: {exc}") from None
        self.created = True  # from here on, delete() tries
        try:
            if self._admin is not None:
                await self._admin.create_vhost(self.name)
            else:
                user = unquote(urlsplit(self.base_url).username or "guest")
                self._ctl("add_vhost", self.name)
                self._ctl("set_permissions", "-p", self.name, user, ".*", ".*", ".*")
        except BenchError:
            raise
        except Exception as exc:
            raise BenchError(f"cannot create vhost {self.name}: {exc}") from None

    async def delete(self) -> None:
        if not self.created:
            return
        self.created = False
        try:
            if self._admin is not None:
                await asyncio.wait_for(self._admin.delete_vhost(self.name), 60)
            else:
                self._ctl("delete_vhost", self.name)
        except Exception as exc:
            print(f"could not delete vhost {self.name}: {exc}", file=sys.stderr)

    @staticmethod
    def _ctl(*args: str) -> None:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0 and not (
            args[0] == "delete_vhost" and "does not exist" in done.stderr + done.stdout
        ):
            raise BenchError(
                f"rabbitmqctl {' '.join(args)} failed: {(done.stderr or done.stdout).strip()}"
            )


try:
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the benchmark process dies (Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Children:
    """The child processes, their logs (stderr, in a temporary directory) and their end."""

    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        self.logdir = logdir
        self.env = env
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.logs: dict[str, Path] = {}

    async def start(
        self, name: str, args: Sequence[str], *, stdout: bool = False, log: Path | None = None
    ) -> asyncio.subprocess.Process:
        self.logs[name] = log or self.logdir / f"{name}.log"
        with self.logs[name].open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *args,
                cwd=str(ROOT),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdout else subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # Ctrl+C reaches only us; we stop the children
                preexec_fn=_die_with_parent,
            )
        self.procs[name] = proc
        return proc

    async def stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(n) for n in list(self.procs)), return_exceptions=True)

    def check_alive(self, *names: str) -> None:
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.returncode is not None:
                raise BenchError(f"{name} exited with code {proc.returncode}\n{self.tail(name)}")

    def exited(self) -> str:
        """The children that died, with the end of their logs."""
        dead = [n for n, p in self.procs.items() if p.returncode is not None]
        return "\n".join(
            f"{n} exited with code {self.procs[n].returncode}\n{self.tail(n)}" for n in dead
        )

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs.get(name)
        if path is None or not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"  [{name}] {line}" for line in text)


async def read_json_line(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - loop.time()))
        if not line:
            raise BenchError("child process ended without a result")
        text = line.decode().strip()
        if text.startswith("{"):
            result: dict[str, Any] = json.loads(text)
            return result


async def raw_round(
    children: Children,
    url: str,
    queue: str,
    warmup: int,
    count: int,
    args: argparse.Namespace,
    figures: Figures,
) -> None:
    consumer = await children.start(
        "raw-consumer",
        [
            __file__,
            "--role",
            "raw-consumer",
            "--url",
            url,
            "--queue",
            queue,
            "--warmup",
            str(warmup),
            "--count",
            str(count),
            "--raw-prefetch",
            str(args.raw_prefetch),
            "--phase-timeout",
            str(args.phase_timeout),
        ],
        stdout=True,
    )
    assert consumer.stdout is not None
    try:
        ready = await asyncio.wait_for(consumer.stdout.readline(), 30)
    except TimeoutError:
        ready = b""
    if ready.strip() != b"ready":
        raise BenchError(f"raw consumer did not start\n{children.tail('raw-consumer')}")
    publisher = await children.start(
        "raw-publisher",
        [
            __file__,
            "--role",
            "raw-publisher",
            "--url",
            url,
            "--warmup",
            str(warmup),
            "--count",
            str(count),
            "--in-flight",
            str(args.in_flight),
        ],
        stdout=True,
    )
    try:
        received, published = await asyncio.gather(
            read_json_line(consumer, args.phase_timeout + 5),
            read_json_line(publisher, args.phase_timeout + 5),
        )
    except (BenchError, TimeoutError):
        raise BenchError(
            "raw run failed\n"
            + children.tail("raw-consumer")
            + "\n"
            + children.tail("raw-publisher")
        ) from None
    await children.stop("raw-consumer")
    await children.stop("raw-publisher")
    if not received["complete"]:
        raise BenchError(f"raw consumer got {received['received']} of {warmup + count} messages")
    figures.add(count, received["seconds"], published["published"], published["seconds"])


def _states(answer: Message) -> tuple[str, dict[str, str]]:
    """Agent id and behaviour states from a ping answer."""
    described = answer.payload if isinstance(answer.payload, dict) else {}
    states = {
        str(b.get("name")): str(b.get("state") or b.get("status"))
        for b in described.get("behaviours", [])
        if isinstance(b, dict)
    }
    return str(described.get("agent")), states


async def wait_for_mesh(client: Agent, children: Children, timeout: float = 45.0) -> None:
    """Until the gateway relays and both agents' behaviours run (pinged through the gateway)."""
    wanted = {
        "gateway": {"relay": "running"},
        PUBLISHER_ID: {"rpc": "running"},
        SUBSCRIBER_ID: {"sink": "running", "rpc": "running"},
    }
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        children.check_alive(*wanted)
        # expect= skips the registry lookup; gateways answer only pings sent to them
        rounds = await asyncio.gather(
            client.control("_all", "ping", timeout=0.5, expect=len(wanted) - 1),
            client.control("gateway", "ping", timeout=0.5, expect=1),
        )
        seen = dict(_states(answer) for answers in rounds for answer in answers)
        if all(
            all(seen.get(agent, {}).get(b) == s for b, s in behaviours.items())
            for agent, behaviours in wanted.items()
        ):
            return
        if loop.time() > deadline:
            raise BenchError(
                f"mesh not up after {timeout:g}s (answered: {sorted(seen)})\n"
                + "\n".join(children.tail(n) for n in wanted)
            )
        await asyncio.sleep(0.2)


async def mesh_round(
    client: Agent,
    children: Children,
    warmup: int,
    count: int,
    args: argparse.Namespace,
    figures: Figures,
) -> None:
    """One blast through the gateway, measured by the subscriber."""
    await client.request(SUBSCRIBER_ID, "expect", {"warmup": warmup, "count": count}, timeout=10)
    await client.request(
        PUBLISHER_ID, "plan", {"total": warmup + count, "in_flight": args.in_flight}, timeout=10
    )
    result = asyncio.ensure_future(
        client.request(
            SUBSCRIBER_ID, "result", {"timeout": args.phase_timeout}, timeout=args.phase_timeout + 5
        )
    )
    try:
        await asyncio.sleep(0.2)  # the result request reaches the subscriber first
        started = await client.control(
            PUBLISHER_ID, "start_behaviour", {"behaviour": "blast"}, timeout=10, expect=1
        )
        if not started or started[0].type.value == "error":
            raise BenchError(f"could not start the publisher: {started}")
        while not result.done():
            await asyncio.wait([result], timeout=1.0)
            children.check_alive("gateway", PUBLISHER_ID, SUBSCRIBER_ID)
    finally:
        if not result.done():
            result.cancel()
    got: dict[str, Any] = result.result()
    if not got["complete"]:
        raise BenchError(f"subscriber got {got['received']} of {warmup + count} messages")
    blast: dict[str, Any] = {}
    for _ in range(100):  # the behaviour ends with its last confirm, about now
        blast = await client.request(PUBLISHER_ID, "stats", {}, timeout=10)
        if blast:
            break
        await asyncio.sleep(0.05)
    figures.add(count, got["seconds"], blast.get("published", 0), blast.get("seconds", 0.0))


async def request_latency(client: Agent, args: argparse.Namespace) -> list[float]:
    for i in range(args.request_warmup):
        await client.request(SUBSCRIBER_ID, "echo", {"seq": i}, timeout=10)
    samples = []
    for i in range(args.requests):
        started = time.perf_counter()
        await client.request(SUBSCRIBER_ID, "echo", {"seq": i}, timeout=10)
        samples.append((time.perf_counter() - started) * 1000.0)
    return samples


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def start_gateway(children: Children, *, audit: bool) -> None:
    level = "info" if audit else "warning"
    log = children.logdir / ("gateway-audit.log" if audit else "gateway.log")
    await children.start("gateway", ["-m", "mesh.cli", "gateway", "--log-level", level], log=log)


async def start_agents(children: Children) -> None:
    for agent_id, cls in ((SUBSCRIBER_ID, "SubscriberAgent"), (PUBLISHER_ID, "PublisherAgent")):
        await children.start(
            agent_id,
            [
                "-m",
                "mesh.cli",
                "run",
                f"bench.throughput:{cls}",
                "--id",
                agent_id,
                "--log-level",
                "warning",
            ],
        )


def say(text: str) -> None:
    print(text, flush=True)


async def orchestrate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    base_url = os.environ.get("MESH_AMQP_URL", DEFAULT_AMQP_URL)
    vhost = Vhost(base_url)
    namespace = vhost.name
    logdir = Path(tempfile.mkdtemp(prefix=f"{vhost.name}-"))
    url = vhost_url(base_url, vhost.name)
    env = dict(os.environ)
    env.update(
        {
            "MESH_AMQP_URL": url,
            "MESH_NAMESPACE": namespace,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        }
    )
    children = Children(logdir, env)
    client: Agent | None = None
    rounds = max(1, args.rounds)
    warmup, count = max(1, args.warmup // rounds), max(1, args.count // rounds)
    raw, mesh, audited = Figures(), Figures(), Figures()
    try:
        await vhost.create()
        load = os.getloadavg()[0]
        say(
            f"throughput: {count * rounds:,} messages per path after {warmup * rounds:,} warm-up "
            f"({rounds} alternating rounds), {len(body(0))}-byte JSON bodies, "
            f"{args.in_flight} publishes awaiting confirms, quorum queues (like the mesh's "
            f"behaviour queues); vhost {vhost.name}; load average {load:.1f} "
            f"on {os.cpu_count()} CPUs"
        )

        client = Client("bench-ctl", settings=Settings.from_env(amqp_url=url, namespace=namespace))
        await client.start()
        await start_gateway(children, audit=False)
        await start_agents(children)
        await wait_for_mesh(client, children)

        for i in range(rounds):
            await raw_round(children, url, f"{RAW_QUEUE}.{i}", warmup, count, args, raw)
            await mesh_round(client, children, warmup, count, args, mesh)
        say(
            f"raw aio-pika  publisher process -> topic exchange -> quorum queue -> consumer "
            f"process (prefetch {args.raw_prefetch}, ack each): {raw.rate:,.0f} msg/s "
            f"({raw.detail()})"
        )
        say(
            f"mesh          Blast behaviour -> mesh.policy -> gateway (audit log off) -> "
            f"mesh.topic -> Sink subscriber behaviour (mailbox {Sink.mailbox_size}, concurrency "
            f"{Sink.max_concurrency}): {mesh.rate:,.0f} msg/s ({mesh.detail()})"
        )

        samples = await request_latency(client, args)
        p50, p99 = statistics.median(samples), percentile(samples, 0.99)
        say(
            f"request/reply through the gateway ({args.requests:,} sequential agent.request "
            f"calls to an @rpc in another process, after {args.request_warmup} warm-up): "
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, mean {statistics.fmean(samples):.2f} ms"
        )

        if not args.skip_audit:
            await children.stop("gateway")
            await start_gateway(children, audit=True)
            await wait_for_mesh(client, children)
            audit_count = max(count, args.count // 2)
            await mesh_round(client, children, warmup, audit_count, args, audited)
            log = children.logs["gateway"]
            with log.open(errors="replace") as lines:
                records = sum(1 for line in lines if "mesh.gateway.audit" in line)
            say(
                f"mesh, gateway audit log on (INFO, {records:,} records to a file; "
                f"{audit_count:,} messages): "
                f"{audited.rate:,.0f} msg/s, {audited.rate / raw.rate:.2f} of raw"
            )

        ratio = round(mesh.rate / raw.rate, 2)  # judged as printed
        missed = []
        if ratio < TARGET_RATIO:
            missed.append(f"ratio {ratio:.2f} < {TARGET_RATIO}")
        if p50 > TARGET_P50_MS:
            missed.append(f"p50 {p50:.2f} ms > {TARGET_P50_MS:g} ms")
        say(
            f"targets (ratio >= {TARGET_RATIO}, request/reply p50 <= {TARGET_P50_MS:g} ms): "
            + ("met" if not missed else "MISSED: " + "; ".join(missed))
        )
        say(f"mesh/raw ratio: {ratio:.2f} (mesh {mesh.rate:.0f} msg/s, raw {raw.rate:.0f} msg/s)")
        return 1 if missed and args.check else 0
    except (RequestTimeout, RemoteError, PublishError, AgentStopped) as exc:
        await asyncio.sleep(0.5)  # let a dying child's exit be noticed
        raise BenchError(f"{type(exc).__name__}: {exc}\n{children.exited()}") from None
    finally:
        await asyncio.shield(cleanup(children, client, vhost, namespace, logdir))


async def cleanup(
    children: Children, client: Agent | None, vhost: Vhost, namespace: str, logdir: Path
) -> None:
    await children.stop_all()
    if client is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.stop(), 10)
    await vhost.delete()
    await drop_redis_namespace(namespace)
    shutil.rmtree(logdir, ignore_errors=True)


async def drop_redis_namespace(namespace: str) -> None:
    """Remove what the agents left in Redis (registry entries) under our namespace."""
    with contextlib.suppress(Exception):
        import redis.asyncio as aioredis

        client = aioredis.from_url(
            Settings.from_env().redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        try:
            keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="measured messages per path")
    parser.add_argument("--warmup", type=int, default=2000, help="messages before measuring")
    parser.add_argument("--rounds", type=int, default=4, help="alternating raw/mesh rounds")
    parser.add_argument("--in-flight", type=int, default=100, help="publishes awaiting confirm")
    parser.add_argument("--raw-prefetch", type=int, default=100, help="raw consumer prefetch")
    parser.add_argument("--requests", type=int, default=1000, help="timed request/reply calls")
    parser.add_argument("--request-warmup", type=int, default=200)
    parser.add_argument(
        "--phase-timeout", type=float, default=60.0, help="seconds one round may take"
    )
    parser.add_argument(
        "--skip-audit", action="store_true", help="skip the run with the gateway's audit log on"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--role", choices=["raw-consumer", "raw-publisher"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--queue", default=RAW_QUEUE, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def orchestrate_until_signal(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await orchestrate(args)
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


def main() -> int:
    args = parse_args()
    try:
        if args.role == "raw-consumer":
            asyncio.run(
                raw_consumer(
                    args.url,
                    args.queue,
                    args.warmup,
                    args.count,
                    args.raw_prefetch,
                    args.phase_timeout,
                )
            )
            return 0
        if args.role == "raw-publisher":
            asyncio.run(raw_publisher(args.url, args.warmup + args.count, args.in_flight))
            return 0
        return asyncio.run(orchestrate_until_signal(args))
    except KeyboardInterrupt:
        if not args.role:
            print("interrupted; child processes and vhost removed", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
