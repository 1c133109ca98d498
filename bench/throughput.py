"""Mesh throughput and request/reply latency against raw aio-pika, on the same broker.

    python bench/throughput.py [--count 20000] [--warmup 2000] [--rounds 4] [--in-flight 100]
                               [--raw-prefetch 100] [--requests 1000] [--skip-audit]
                               [--skip-authorized] [--skip-full] [--check]

One run measures, every party in an OS process of its own:

(a) raw aio-pika: a publisher process (confirm channel, ``--in-flight`` publishes awaiting
    their confirm at once) -> a topic exchange -> a quorum queue (the mesh's behaviour queues
    are quorum queues) -> a consumer process (manual ack per message, prefetch
    ``--raw-prefetch``);
(b) the mesh, pass-through: the ``Blast`` behaviour of ``PublisherAgent`` (``--in-flight``
    concurrent ``self.publish``) -> ``mesh.policy`` -> the gateway (``python -m mesh.cli
    gateway``, no policy: open mode) -> ``mesh.topic`` -> the ``Sink`` subscriber behaviour
    of ``SubscriberAgent`` (default mailbox and concurrency); both agents run as ``python -m
    mesh.cli run bench.throughput:...``, every party as the broker user of
    ``MESH_AMQP_URL``.  The gateway runs at log level WARNING, then once more at INFO (its
    per-message audit log on, as in production, written to a file);
(c) the mesh, authorized (issue 9): the same processes, restarted with the gateway's
    authorize stage enforcing a realistic policy (``POLICY``: 20 principals, the bench's
    four among them, and 50 rules in six rule sets, one in audit mode; written to the
    temporary directory and checked with ``mesh.policy.load_policy`` first) and every
    party, the control client "bench-ctl" too, connected as its principal's broker user
    ``broker_user(namespace, principal)`` (made with a random password and every
    permission on the vhost through the management API, deleted at the end);
(d) the mesh, full pipeline (issue 11): the authorized path with every stage of the gateway
    on: its policy is ``POLICY`` and ``FULL_SECTIONS`` (10 payload schemas, the bench's topic
    among them, which the publisher names with ``publish(..., schema=SCHEMA)``; DLP rules
    that block, redact and alert on the bench's topics, scanning every reading and finding
    nothing in it; rate limits that apply to the publisher, too high to bind), checked like
    (c)'s, and the gateway keeps the tamper-evident audit trail (``MESH_AUDIT_KEY``), one
    record per message in Redis.  After the run the trail is verified
    (``mesh.audit.verify_audit``), and the records verified per second are printed;
(e) request/reply round trips through the gateway (pass-through): ``--requests``
    sequential ``agent.request`` calls to an ``@rpc`` of the subscriber agent.

Throughput is what the consumer received after the warm-up, divided by the time from the
warm-up's last message to the last one.  (a)-(d) alternate in ``--rounds`` rounds of
``count / rounds`` messages (after ``warmup / rounds`` each) so that load from other programs
weighs on all alike: even rounds run raw, pass-through, authorized, full; odd rounds full,
authorized, pass-through, raw, so the mesh's processes restart (each restart awaited) as
the setup changes, and each mesh path runs after a restart as often as not.  Each figure
is the total over its rounds.  The last lines are
``authorized/pass-through ratio: R (authorized X msg/s, pass-through Y msg/s)``,
``full/pass-through ratio: R (full X msg/s, pass-through Y msg/s)`` and, last,
``mesh/raw ratio: R (mesh X msg/s, raw Y msg/s)`` (the pass-through mesh, audit log off).
Targets on a 2-core machine: mesh/raw R >= 0.5, request/reply p50 <= 3 ms,
authorized/pass-through R >= 0.95, full/pass-through R >= 0.8 and an audit trail that
verifies (``--check``: exit 1 when one is missed; ``--skip-authorized`` and ``--skip-full``
leave (c) and (d) and their targets out).

Uses ``MESH_AMQP_URL`` for the broker's host and credentials, in a vhost of its own that it
creates and deletes (``mesh.devservices.BrokerAdmin``, else ``rabbitmqctl``), and a Redis
namespace of its own; child processes, broker users, vhost and namespace go away on success,
failure and Ctrl+C alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fnmatch
import json
import logging
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
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
from mesh.audit import AuditKeys, verify_audit
from mesh.config import DEFAULT_AMQP_URL, Settings
from mesh.management import ManagementAPI, ManagementError
from mesh.policy import Action, Policy, PolicyError, broker_user, load_policy
from mesh.policy.schemas import SchemaViolation
from mesh.provision.credentials import url_as
from mesh.topology import matches

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "bench.v7.reading"
PUBLISHER_ID = "bench-pub"
SUBSCRIBER_ID = "bench-sub"
CONTROL_ID = "bench-ctl"
GATEWAY_ID = "gateway"
RAW_EXCHANGE = "bench.raw"
RAW_QUEUE = "bench.raw"
BODY_BYTES = 200
SCHEMA = "bench-reading@1"
"""The schema version the full path's publisher names (``x-mesh-schema``)."""
AUDIT_KEY_ID = "bench"
TARGET_RATIO = 0.5
TARGET_P50_MS = 3.0
TARGET_AUTHORIZED_RATIO = 0.95
TARGET_FULL_RATIO = 0.8


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
    """Publishes the agent's ``plan``: ``total`` readings, ``in_flight`` awaiting confirms,
    naming the schema version ``schema`` (if any)."""

    autostart = False

    async def run(self) -> int | None:
        agent = self.agent
        assert isinstance(agent, PublisherAgent)
        total, in_flight = agent.plan["total"], agent.plan["in_flight"]
        schema = agent.plan.get("schema")
        next_seq = 0
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal next_seq
            while next_seq < total:
                seq = next_seq
                next_seq += 1
                await self.publish(TOPIC, payload(seq), schema=schema)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        agent.last_blast = {"published": total, "seconds": time.perf_counter() - started}
        return 0


class PublisherAgent(Agent):
    behaviours = [Blast]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan: dict[str, Any] = {"total": 0, "in_flight": 1}
        self.last_blast: dict[str, Any] = {}

    @rpc("plan")
    async def set_plan(self, msg: Message, plan: Any) -> dict[str, Any]:
        schema = plan.get("schema")
        self.plan = {
            "total": int(plan["total"]),
            "in_flight": int(plan["in_flight"]),
            "schema": None if schema is None else str(schema),
        }
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


# --- the authorized path: its policy and broker users ----------------------------------------

BENCH_PRINCIPALS = {
    GATEWAY_ID: "gateway",
    PUBLISHER_ID: "bench-publisher",
    SUBSCRIBER_ID: "bench-subscriber",
    CONTROL_ID: "bench-operator",
}
"""The bench's agent ids and the principals they belong to (one broker user each)."""

POLICY_PRINCIPALS, POLICY_RULES = 20, 50

POLICY = """\
# The authorized path's policy (bench/throughput.py): a fleet mesh of 20 principals and
# 50 rules, in which the bench's four parties are principals like any other.
principals:
  gateway: {kind: gateway}
  bench-publisher: {kind: agent, agents: [bench-pub]}
  bench-subscriber: {kind: agent, agents: [bench-sub]}
  bench-operator: {kind: operator, agents: [bench-ctl]}
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
  trucks: {kind: agent, agents: ["truck-*"]}
  monitor: {kind: agent}
  alerting: {kind: agent, agents: ["alert-*"]}
  fleet-manager: {kind: agent, agents: ["fleet-*"]}
  routing: {kind: agent, agents: ["route-*"]}
  weather: {kind: agent, agents: ["weather-*"]}
  maintenance: {kind: agent, agents: ["maint-*"]}
  billing: {kind: agent, agents: ["billing-*"]}
  archiver: {kind: agent, agents: ["archive-*"]}
  geofence: {kind: agent, agents: ["geo-*"]}
  mesh-cli: {kind: operator, agents: ["client-*"]}
  sre: {kind: operator, agents: ["sre-*"]}
  bridge: {kind: bridge}
  dashboard: {kind: user}
  partner-api: {kind: user}

roles:
  operators: [bench-operator, mesh-cli, sre]
  observers: [monitor, dashboard]
  fleet: [vehicles, trucks]
  services: [alerting, fleet-manager, routing, weather, maintenance, billing, archiver, geofence]

rule_sets:
  telemetry:
    rules:
      - {allow: publish, who: fleet, topics: "vehicle.{self}.#"}
      - {allow: publish, who: bench-publisher, topics: "bench.*.reading"}
      - {allow: subscribe, who: bench-subscriber, topics: "bench.#"}
      - {allow: subscribe, who: observers, topics: ["vehicle.#", "alerts.#"]}
      - {allow: subscribe, who: fleet, topics: "alerts.speeding.*"}
      - {allow: publish, who: monitor, topics: "alerts.speeding.*"}
      - {allow: publish, who: alerting, topics: "alerts.#"}
      - {allow: subscribe, who: alerting, topics: ["vehicle.*.speed", "vehicle.*.position"]}
      - {allow: publish, who: weather, topics: "weather.#"}
      - {allow: subscribe, who: [routing, fleet], topics: "weather.#"}
      - {allow: publish, who: routing, topics: "route.#"}
      - {allow: subscribe, who: fleet, topics: "route.{self}.#"}
      - {allow: publish, who: geofence, topics: "geofence.#"}
      - {allow: subscribe, who: geofence, topics: "vehicle.*.position"}
      - {allow: subscribe, who: archiver, topics: "#"}
      - {deny: publish, who: "*", topics: "vehicle.*.debug.#"}
      - {deny: subscribe, who: fleet, topics: "billing.#"}
      - {deny: publish, who: bench-publisher, topics: "bench.*.control.#"}

  fleet-operations:
    rules:
      - {allow: publish, who: maintenance, topics: "maintenance.#"}
      - {allow: subscribe, who: maintenance, topics: ["vehicle.*.diagnostics.#", "alerts.#"]}
      - {allow: publish, who: billing, topics: "billing.#"}
      - {allow: subscribe, who: billing, topics: ["route.*.completed", "vehicle.*.odometer"]}
      - {allow: publish, who: fleet-manager, topics: "fleet.#"}
      - {allow: subscribe, who: fleet-manager, topics: ["vehicle.#", "route.#", "maintenance.#"]}

  requests:
    rules:
      - {allow: request, who: bench-operator, request: {agent: "bench-*", operation: "*"}}
      - {allow: request, who: operators, request: {agent: "*", operation: status}}
      - {allow: request, who: observers, request: {agent: "v[0-9]*", operation: status}}
      - {allow: request, who: fleet-manager, request: {agent: "route-*", operation: "plan_*"}}
      - {allow: request, who: routing, request: {agent: "weather-*", operation: forecast}}
      - allow: request
        who: [billing, fleet-manager]
        request: {agent: "v[0-9]*", operation: odometer}
      - {deny: request, who: "*", request: {agent: "*", operation: "admin_*"}}
      - {deny: request, who: dashboard, request: {agent: "billing-*", operation: "*"}}
      - {allow: reply, who: "*", reply: {agent: "*"}}       # answering requests and control
      - {deny: reply, who: fleet, reply: {agent: "billing-*"}}

  operations:
    rules:
      - {allow: control, who: operators, control: {agent: "*", command: ping}}
      - {allow: control, who: bench-operator, control: {agent: "bench-*", command: "*"}}
      - {allow: control, who: [mesh-cli, sre], control: {agent: "*", command: "*"}}
      - {deny: control, who: "*", control: {agent: "_all", command: shutdown}}
      - {deny: control, who: sre, control: {agent: "billing-*", command: "*"}}
      - {allow: publish, who: [mesh-cli, sre], topics: "#"}
      - {allow: subscribe, who: operators, topics: "#"}

  partners:
    rules:
      - {allow: subscribe, who: dashboard, topics: ["vehicle.*.position", "alerts.#"]}
      - {allow: request, who: partner-api, request: {agent: "route-*", operation: eta}}
      - {allow: publish, who: partner-api, topics: "partner.{self}.#"}
      - {deny: subscribe, who: partner-api, topics: "vehicle.*.diagnostics.#"}

  hardening:                    # rolled out in audit mode: logged as "would deny", never blocks
    mode: audit
    rules:
      - {deny: publish, who: "*", topics: "bench.*.debug.#"}
      - {deny: request, who: observers, request: {agent: "*", operation: "dump_*"}}
      - {deny: control, who: operators, control: {agent: "_all", command: stop_behaviour}}
      - {deny: reply, who: fleet, reply: {agent: dashboard}}
      - {deny: publish, who: bench-publisher, topics: "bench.*.reading.raw"}
"""


FULL_SCHEMAS = 10

FULL_SECTIONS = """\

# The full path's further sections (bench/throughput.py): payload schemas, data-loss
# prevention and rate limits, every one of them applying to the bench's readings.
schemas:
  definitions:
    bench-reading:
      - version: 1
        inline:
          type: object
          properties:
            vehicle: {type: string, pattern: "^v[0-9]+$"}
            seq: {type: integer, minimum: 0}
            speed_kmh: {type: number, minimum: 0, maximum: 400}
            heading: {type: number, minimum: 0, exclusiveMaximum: 360}
            lat: {type: number, minimum: -90, maximum: 90}
            lon: {type: number, minimum: -180, maximum: 180}
            ts: {type: number, minimum: 0}
            note: {type: string, maxLength: 1024}
          required: [vehicle, seq, speed_kmh, heading, lat, lon, ts]
          additionalProperties: false
    vehicle-speed:
      - version: 1
        inline:
          type: object
          properties:
            vehicle: {type: string}
            speed_kmh: {type: number, minimum: 0}
          required: [vehicle, speed_kmh]
      - version: 2
        inline:
          type: object
          properties:
            vehicle: {type: string}
            speed_kmh: {type: number, minimum: 0}
            ts: {type: number}
          required: [vehicle, speed_kmh, ts]
    vehicle-position:
      - version: 1
        inline:
          type: object
          properties:
            vehicle: {type: string}
            lat: {type: number, minimum: -90, maximum: 90}
            lon: {type: number, minimum: -180, maximum: 180}
          required: [vehicle, lat, lon]
    diagnostics:
      - version: 1
        inline:
          type: object
          properties:
            code: {type: string, pattern: "^[PCBU][0-9]{4}$"}
            severity: {enum: [info, warning, critical]}
          required: [code, severity]
    alert:
      - version: 1
        inline:
          type: object
          properties:
            vehicle: {type: string}
            kind: {type: string}
            level: {type: integer, minimum: 1, maximum: 5}
          required: [vehicle, kind]
    weather-report:
      - version: 1
        inline:
          type: object
          properties:
            area: {type: string}
            temperature_c: {type: number}
            wind_kmh: {type: number, minimum: 0}
          required: [area]
    route-plan:
      - version: 1
        inline:
          type: object
          properties:
            route: {type: string}
            stops: {type: array, items: {type: string}, maxItems: 100}
          required: [route, stops]
    maintenance-ticket:
      - version: 1
        inline:
          type: object
          properties:
            ticket: {type: string}
            vehicle: {type: string}
            due: {type: string, format: date}
          required: [ticket, vehicle]
    billing-event:
      - version: 1
        inline:
          type: object
          properties:
            account: {type: string}
            amount_cents: {type: integer}
            currency: {type: string, pattern: "^[A-Z]{3}$"}
          required: [account, amount_cents, currency]
    geofence-event:
      - version: 1
        inline:
          type: object
          properties:
            vehicle: {type: string}
            fence: {type: string}
            entered: {type: boolean}
          required: [vehicle, fence, entered]
  payloads:
    - {topics: "bench.*.reading", accept: bench-reading@1}
    - {topics: "vehicle.*.speed", accept: vehicle-speed}
    - {topics: "vehicle.*.position", accept: vehicle-position@1}
    - {topics: "vehicle.*.diagnostics.#", accept: diagnostics@1}
    - {topics: "alerts.#", accept: alert@1}
    - {topics: "weather.#", accept: weather-report@1}
    - {topics: "route.#", accept: route-plan@1}
    - {topics: "maintenance.#", accept: maintenance-ticket@1}
    - {topics: "billing.#", accept: billing-event@1}
    - {topics: "geofence.#", accept: geofence-event@1}
  require: ["bench.#", "vehicle.#"]

dlp:
  max_payload_bytes: 65536
  rules:
    - detect: [card, iban, ssn, private_key, aws_access_key, aws_secret_key, gcp_api_key,
               azure_key, jwt, bearer_token, secret]
      action: block
      topics: ["bench.#", "vehicle.#", "partner.#"]
    - detect: [phone, email]
      action: redact
      topics: ["bench.#", "vehicle.*.trip", "alerts.#"]
    - pattern: 'EMP-[0-9]{6}'
      name: employee_id
      action: alert
      topics: ["bench.#", "maintenance.#"]
    - detect: [card, iban]
      action: block
      topics: "billing.#"

rate_limits:
  bench-readings:               # high enough never to bind: the bench measures the stage
    who: bench-publisher
    topics: "bench.#"
    rate: 1000000/s
    burst: 1000000
  per-principal:
    who: "*"
    rate: 1000000/s
    burst: 1000000
  fleet-telemetry:
    who: fleet
    topics: "vehicle.#"
    rate: 50/s
    burst: 100
  partner-api:
    who: partner-api
    rate: 600/min
  alerts:
    who: [monitor, alerting]
    topics: "alerts.#"
    rate: 200/s
    shared: true
"""


def bench_traffic(instance: str = "0a1b2c3d") -> list[tuple[str, Action, str]]:
    """What the bench's parties send through an authorizing gateway: (agent, action, target).

    Registry events are left out: the gateway checks each against its sender only.
    """
    requests = [(SUBSCRIBER_ID, op) for op in ("expect", "result", "echo")] + [
        (PUBLISHER_ID, op) for op in ("plan", "stats")
    ]
    return [
        (PUBLISHER_ID, "publish", TOPIC),
        (SUBSCRIBER_ID, "subscribe", "bench.#"),  # Sink's binding (the broker's to check)
        *((CONTROL_ID, "request", f"_req.{agent}.{op}") for agent, op in requests),
        (CONTROL_ID, "control", f"_ctl.{PUBLISHER_ID}.start_behaviour"),
        (CONTROL_ID, "control", "_ctl._all.ping"),
        (CONTROL_ID, "control", f"_ctl.{GATEWAY_ID}.ping"),
        *((agent, "reply", f"_reply.{CONTROL_ID}.{instance}") for agent in BENCH_PRINCIPALS),
    ]


def write_policy(
    directory: Path, name: str = "policy.yaml", text: str = POLICY
) -> tuple[Path, Policy]:
    """``text`` (by default ``POLICY``) as a file ``name`` in ``directory``, loaded with
    ``mesh.policy.load_policy`` and checked: its size, the bench's ids resolving to their
    principals (no other principal's glob matching them), and the bench's traffic allowed by
    enforced rules."""
    path = directory / name
    path.write_text(text, encoding="utf-8")
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        raise BenchError("the bench's policy is invalid:\n" + "\n".join(exc.lines())) from None
    problems = []
    principals, rules = len(policy.principals()), len(policy.rules)
    if (principals, rules) != (POLICY_PRINCIPALS, POLICY_RULES):
        problems.append(
            f"{principals} principals and {rules} rules, not {POLICY_PRINCIPALS} and {POLICY_RULES}"
        )
    for agent, name in BENCH_PRINCIPALS.items():
        found = policy.principal_for_agent(agent)
        if found is None or found.name != name:
            problems.append(f"{agent} is {found.name if found else 'no principal'}, not {name}")
        problems += [
            f"{agent} matches {glob!r} of {other.name}"
            for other in policy.principals()
            if other.name != name
            for glob in other.agents
            if fnmatch.fnmatchcase(agent, glob)
        ]
    for agent, action, target in bench_traffic():
        decision = policy.decide(agent, action, target)
        if not decision.allowed or decision.would_deny:
            problems.append(f"{agent} {action} {target}: {decision.reason}")
    if problems:
        raise BenchError("the bench's policy does not fit the bench:\n  " + "\n  ".join(problems))
    return path, policy


def write_full_policy(directory: Path, messages: int) -> tuple[Path, Policy]:
    """``POLICY`` and ``FULL_SECTIONS`` as a file in ``directory``, checked as
    ``write_policy`` checks and further: ``FULL_SCHEMAS`` schemas, the bench's readings
    following ``SCHEMA``, DLP rules that block, redact and alert on the bench's topic
    finding nothing in a reading, and rate limits on the publisher's readings that let
    ``messages`` pass at once."""
    path, policy = write_policy(directory, "policy-full.yaml", POLICY + FULL_SECTIONS)
    problems = []
    schemas = len(policy.spec.schemas.definitions)
    if schemas != FULL_SCHEMAS:
        problems.append(f"{schemas} schemas, not {FULL_SCHEMAS}")
    expectation = policy.schemas.expectation(TOPIC)
    try:
        if expectation is None:
            raise SchemaViolation(f"no schema applies to {TOPIC}")
        for seq in (0, 10**9):
            expectation.check(SCHEMA, json.dumps(payload(seq)).encode())
    except SchemaViolation as exc:
        problems.append(f"a reading does not follow {SCHEMA}: {exc}")
    actions = {r.action for r in policy.spec.dlp.rules if any(matches(t, TOPIC) for t in r.topics)}
    if actions != {"block", "redact", "alert"}:
        problems.append(f"DLP on {TOPIC} is {sorted(actions)}, not block, redact and alert")
    scanner = policy.scanner
    findings = () if scanner is None else scanner.scan(payload(0), topic=TOPIC).findings
    if findings:
        problems.append(f"DLP finds {sorted({f.kind for f in findings})} in a reading")
    publisher = policy.principal(BENCH_PRINCIPALS[PUBLISHER_ID])
    assert publisher is not None  # write_policy checked it
    names = {publisher.name, *publisher.roles, "*"}
    limits = [
        (name, spec)
        for name, spec in policy.rate_limits.items()
        if names & set(spec.who) and any(matches(t, TOPIC) for t in spec.topics)
    ]
    if not limits:
        problems.append(f"no rate limit applies to {TOPIC}")
    problems += [
        f"rate limit {name} ({spec.describe()}) could bind {messages:,} readings"
        for name, spec in limits
        if spec.capacity < messages
    ]
    if problems:
        raise BenchError(
            "the full path's policy does not fit the bench:\n  " + "\n  ".join(problems)
        )
    return path, policy


class BrokerUsers:
    """One broker user per bench principal (``broker_user(namespace, principal)``), with a
    random password and every permission on the bench's vhost; deleted at the end."""

    def __init__(self, base_url: str, vhost: str, namespace: str) -> None:
        self.base_url = base_url
        self.vhost = vhost
        self.namespace = namespace
        self.made: list[str] = []
        self.urls: dict[str, str] = {}
        """Agent id -> its AMQP URL (the bench's vhost, its principal's user)."""
        self._api: Any = None

    async def create(self, url: str) -> None:
        try:
            self._api = ManagementAPI.for_settings(Settings.from_env(amqp_url=self.base_url))
            for agent, principal in BENCH_PRINCIPALS.items():
                user = broker_user(self.namespace, principal)
                password = secrets.token_urlsafe(24)
                self.made.append(user)  # from here on, delete() tries
                await self._api.put_user(user, password)
                await self._api.set_permissions(self.vhost, user, ".*", ".*", ".*")
                self.urls[agent] = url_as(url, user, password)
        except ManagementError as exc:
            raise BenchError(
                f"cannot create the authorized path's broker users: {exc} "
                "(--skip-authorized runs without them)"
            ) from None

    async def delete(self) -> None:
        made, self.made = self.made, []
        for user in made:
            try:
                await asyncio.wait_for(self._api.delete_user(user), 30)
            except Exception as exc:
                print(f"could not delete broker user {user}: {exc}", file=sys.stderr)


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
    gateway_cpu: float = 0.0
    """The gateway process's CPU seconds over the rounds (warm-up and control included)."""
    gateway_messages: int = 0

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

    def add_gateway_cpu(self, seconds: float, messages: int) -> None:
        self.gateway_cpu += seconds
        self.gateway_messages += messages

    def detail(self) -> str:
        rounds = ", ".join(f"{r:,.0f}" for r in self.rounds)
        text = f"rounds {rounds}; publisher confirmed {self.publish_rate:,.0f} msg/s"
        if self.gateway_messages:
            per_message = self.gateway_cpu / self.gateway_messages * 1e6
            text += f"; gateway CPU {per_message:,.0f} us/message"
        return text


def cpu_seconds(proc: asyncio.subprocess.Process | None) -> float | None:
    """User and system CPU time of a running child so far (Linux ``/proc``), else ``None``."""
    if proc is None or proc.returncode is not None:
        return None
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # from field 3 (state) on; utime, stime: 14, 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        self,
        name: str,
        args: Sequence[str],
        *,
        stdout: bool = False,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> asyncio.subprocess.Process:
        """Start ``python args``; ``env`` overrides some of the children's environment."""
        self.logs[name] = log or self.logdir / f"{name}.log"
        with self.logs[name].open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *args,
                cwd=str(ROOT),
                env={**self.env, **(env or {})},
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
    *,
    schema: str | None = None,
) -> None:
    """One blast through the gateway, measured by the subscriber; the publisher names
    ``schema`` (if any)."""
    cpu_before = cpu_seconds(children.procs.get("gateway"))
    await client.request(SUBSCRIBER_ID, "expect", {"warmup": warmup, "count": count}, timeout=10)
    plan = {"total": warmup + count, "in_flight": args.in_flight, "schema": schema}
    await client.request(PUBLISHER_ID, "plan", plan, timeout=10)
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
    cpu_after = cpu_seconds(children.procs.get("gateway"))
    if cpu_before is not None and cpu_after is not None:
        figures.add_gateway_cpu(cpu_after - cpu_before, warmup + count)


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


@dataclass
class MeshSetup:
    """How the mesh's processes run: ``pass-through`` (the gateway in open mode, every party
    as the bench's broker user), ``authorized`` (the gateway enforcing ``POLICY``, every
    party as its principal's broker user) or ``full`` (as authorized, the policy with
    ``FULL_SECTIONS``, the gateway auditing).  ``client`` is the control client "bench-ctl"
    connected as that setup's user; ``schema`` what the publisher names (``x-mesh-schema``)."""

    name: str
    client: Agent
    gateway_env: dict[str, str] = field(default_factory=dict)
    agent_env: dict[str, dict[str, str]] = field(default_factory=dict)
    schema: str | None = None

    @property
    def gateway_log(self) -> str:
        return "gateway.log" if self.name == "pass-through" else f"gateway-{self.name}.log"


async def start_gateway(children: Children, setup: MeshSetup, *, audit: bool = False) -> None:
    level = "info" if audit else "warning"
    log = children.logdir / ("gateway-audit.log" if audit else setup.gateway_log)
    await children.start(
        "gateway",
        ["-m", "mesh.cli", "gateway", "--log-level", level],
        log=log,
        env=setup.gateway_env,
    )


async def start_agents(children: Children, setup: MeshSetup) -> None:
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
            env=setup.agent_env.get(agent_id),
        )


async def switch_mesh(children: Children, setup: MeshSetup) -> None:
    """Restart the gateway and both agents as ``setup`` says, and wait until they run.

    The agents stop first, so that the gateway that knows their users relays their last
    registry events (an authorizing gateway would deny the other setup's users).
    """
    await asyncio.gather(*(children.stop(n) for n in (PUBLISHER_ID, SUBSCRIBER_ID)))
    await children.stop("gateway")
    await start_gateway(children, setup)
    await start_agents(children, setup)
    await wait_for_mesh(setup.client, children)
    await asyncio.sleep(1.0)  # their start-up (registry, heartbeats) settles before measuring


def count_lines(path: Path, *needles: str) -> list[int]:
    """How many lines of ``path`` contain each of ``needles``."""
    counts = [0] * len(needles)
    with path.open(errors="replace") as lines:
        for line in lines:
            for i, needle in enumerate(needles):
                counts[i] += needle in line
    return counts


def first_lines(
    path: Path, needle: str, *, skip: str = "", limit: int = 3, width: int = 300
) -> list[str]:
    """The first ``limit`` lines of ``path`` containing ``needle`` (and not ``skip``), cut at
    ``width``."""
    found: list[str] = []
    with path.open(errors="replace") as lines:
        for line in lines:
            if needle in line and not (skip and skip in line):
                found.append(line.rstrip()[:width])
                if len(found) == limit:
                    break
    return found


def say(text: str) -> None:
    print(text, flush=True)


async def orchestrate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    base_url = os.environ.get("MESH_AMQP_URL", DEFAULT_AMQP_URL)
    base_user = unquote(urlsplit(base_url).username or "guest")
    vhost = Vhost(base_url)
    namespace = vhost.name
    logdir = Path(tempfile.mkdtemp(prefix=f"{vhost.name}-"))
    url = vhost_url(base_url, vhost.name)
    env = dict(os.environ)
    # The pass-through gateway enforces no policy and keeps no trail; the others ours.
    for name in ("MESH_POLICY", "MESH_AUDIT_KEY", "MESH_AUDIT_KEY_FILE", "MESH_AUDIT_KEYS_FILE"):
        env.pop(name, None)
    audit_key = secrets.token_hex(32)
    env.update(
        {
            "MESH_AMQP_URL": url,
            "MESH_NAMESPACE": namespace,
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        }
    )
    children = Children(logdir, env)
    users = BrokerUsers(base_url, vhost.name, namespace)
    clients: list[Agent] = []
    rounds = max(1, args.rounds)
    warmup, count = max(1, args.warmup // rounds), max(1, args.count // rounds)
    raw, mesh, authorized, full, audited = (Figures() for _ in range(5))
    try:
        await vhost.create()
        load = os.getloadavg()[0]
        paths = ", ".join(
            ["raw", "pass-through mesh"]
            + ([] if args.skip_authorized else ["authorized mesh"])
            + ([] if args.skip_full else ["full pipeline"])
        )
        say(
            f"throughput: {count * rounds:,} messages per path after {warmup * rounds:,} warm-up "
            f"({rounds} alternating rounds of {paths}), {len(body(0))}-byte JSON bodies, "
            f"{args.in_flight} publishes awaiting confirms, quorum queues (like the mesh's "
            f"behaviour queues); vhost {vhost.name}; load average {load:.1f} "
            f"on {os.cpu_count()} CPUs"
        )

        client = Client(CONTROL_ID, settings=Settings.from_env(amqp_url=url, namespace=namespace))
        clients.append(client)
        await client.start()
        passthrough = MeshSetup("pass-through", client)
        secured: MeshSetup | None = None
        complete: MeshSetup | None = None
        if not (args.skip_authorized and args.skip_full):
            await users.create(url)
            secure_client = Client(
                CONTROL_ID,
                settings=Settings.from_env(amqp_url=users.urls[CONTROL_ID], namespace=namespace),
            )
            clients.append(secure_client)
            await secure_client.start()
            agent_env = {a: {"MESH_AMQP_URL": users.urls[a]} for a in (PUBLISHER_ID, SUBSCRIBER_ID)}
            say(
                f"authorized mesh: policy of {POLICY_PRINCIPALS} principals and {POLICY_RULES} "
                f"rules (checked with mesh.policy.load_policy); broker users "
                + ", ".join(broker_user(namespace, p) for p in BENCH_PRINCIPALS.values())
            )
        if not args.skip_authorized:
            policy_path, _ = write_policy(logdir)
            secured = MeshSetup(
                "authorized",
                secure_client,
                gateway_env={
                    "MESH_AMQP_URL": users.urls[GATEWAY_ID],
                    "MESH_POLICY": str(policy_path),
                },
                agent_env=agent_env,
            )
        if not args.skip_full:
            full_path, full_policy = write_full_policy(logdir, (warmup + count) * rounds)
            complete = MeshSetup(
                "full",
                secure_client,
                gateway_env={
                    "MESH_AMQP_URL": users.urls[GATEWAY_ID],
                    "MESH_POLICY": str(full_path),
                    "MESH_AUDIT_KEY": audit_key,
                    "MESH_AUDIT_KEY_ID": AUDIT_KEY_ID,
                },
                agent_env=agent_env,
                schema=SCHEMA,
            )
            say(
                f"full pipeline: the authorized mesh's policy with {FULL_SCHEMAS} schemas, "
                f"{len(full_policy.spec.dlp.rules)} DLP rules and "
                f"{len(full_policy.rate_limits)} rate limits (checked with the bench's readings), "
                f"the gateway keeping the audit trail"
            )
        await start_gateway(children, passthrough)
        await start_agents(children, passthrough)
        await wait_for_mesh(client, children)
        current = passthrough

        async def through(setup: MeshSetup, figures: Figures) -> None:
            nonlocal current
            if current is not setup:
                await switch_mesh(children, setup)
                current = setup
            await mesh_round(
                setup.client, children, warmup, count, args, figures, schema=setup.schema
            )

        # Even rounds: raw, pass-through, authorized, full; odd rounds the other way round.
        order: list[tuple[MeshSetup | None, Figures]] = [(None, raw), (passthrough, mesh)]
        order += [(setup, f) for setup, f in ((secured, authorized), (complete, full)) if setup]
        for i in range(rounds):
            for setup, figures in order if i % 2 == 0 else reversed(order):
                if setup is None:
                    await raw_round(children, url, f"{RAW_QUEUE}.{i}", warmup, count, args, raw)
                else:
                    await through(setup, figures)
        if current is not passthrough:
            await switch_mesh(children, passthrough)
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
        denial = "mesh.gateway.relay: denied "
        # A stopping gateway announces its leave through the gateway queue; the next
        # gateway relays it, and an authorizing one denies the pass-through user.
        farewell = f"from {base_user}/{GATEWAY_ID} on _registry.leave: "
        if secured is not None:
            log = logdir / secured.gateway_log
            denied, farewells, would_deny = count_lines(
                log, denial, farewell, "mesh.gateway.authorize: would deny "
            )
            say(
                f"authorized    the same, every party as its principal's broker user, the "
                f"gateway's authorize stage enforcing the policy (its log: {denied - farewells} "
                f"denied, {would_deny} would deny; and {farewells} denied leave events of the "
                f"stopped pass-through gateway, user {base_user}): {authorized.rate:,.0f} msg/s "
                f"({authorized.detail()})"
            )
            for line in first_lines(log, denial, skip=farewell):
                say(f"  {line}")
        if complete is not None:
            log = logdir / complete.gateway_log
            denied, farewells = count_lines(log, denial, farewell)
            say(
                f"full          the same, every stage on: authorize, rate-limit, schema "
                f"({SCHEMA} named), DLP, the audit trail (its log: {denied - farewells} denied; "
                f"and {farewells} denied leave events of the stopped pass-through gateway, user "
                f"{base_user}): {full.rate:,.0f} msg/s ({full.detail()})"
            )
            for line in first_lines(log, denial, skip=farewell):
                say(f"  {line}")
            verified = await verify_trail(namespace, audit_key)
            say(verified.line)

        samples = await request_latency(client, args)
        p50, p99 = statistics.median(samples), percentile(samples, 0.99)
        say(
            f"request/reply through the gateway ({args.requests:,} sequential agent.request "
            f"calls to an @rpc in another process, after {args.request_warmup} warm-up): "
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, mean {statistics.fmean(samples):.2f} ms"
        )

        if not args.skip_audit:
            await children.stop("gateway")
            await start_gateway(children, passthrough, audit=True)
            await wait_for_mesh(client, children)
            audit_count = max(count, args.count // 2)
            await mesh_round(client, children, warmup, audit_count, args, audited)
            (records,) = count_lines(children.logs["gateway"], "mesh.gateway.audit")
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
        targets = f"ratio >= {TARGET_RATIO}, request/reply p50 <= {TARGET_P50_MS:g} ms"
        authorized_ratio = full_ratio = 0.0
        if secured is not None:
            authorized_ratio = round(authorized.rate / mesh.rate, 2)
            targets += f", authorized/pass-through ratio >= {TARGET_AUTHORIZED_RATIO}"
            if authorized_ratio < TARGET_AUTHORIZED_RATIO:
                missed.append(
                    f"authorized/pass-through ratio {authorized_ratio:.2f} "
                    f"< {TARGET_AUTHORIZED_RATIO}"
                )
        if complete is not None:
            full_ratio = round(full.rate / mesh.rate, 2)
            targets += f", full/pass-through ratio >= {TARGET_FULL_RATIO}, audit trail verifies"
            if full_ratio < TARGET_FULL_RATIO:
                missed.append(f"full/pass-through ratio {full_ratio:.2f} < {TARGET_FULL_RATIO}")
            if not verified.ok:
                missed.append("the audit trail does not verify")
        say(f"targets ({targets}): " + ("met" if not missed else "MISSED: " + "; ".join(missed)))
        if secured is not None:
            say(
                f"authorized/pass-through ratio: {authorized_ratio:.2f} (authorized "
                f"{authorized.rate:.0f} msg/s, pass-through {mesh.rate:.0f} msg/s)"
            )
        if complete is not None:
            say(
                f"full/pass-through ratio: {full_ratio:.2f} (full {full.rate:.0f} msg/s, "
                f"pass-through {mesh.rate:.0f} msg/s)"
            )
        say(f"mesh/raw ratio: {ratio:.2f} (mesh {mesh.rate:.0f} msg/s, raw {raw.rate:.0f} msg/s)")
        return 1 if missed and args.check else 0
    except (RequestTimeout, RemoteError, PublishError, AgentStopped) as exc:
        await asyncio.sleep(0.5)  # let a dying child's exit be noticed
        raise BenchError(f"{type(exc).__name__}: {exc}\n{children.exited()}") from None
    finally:
        await asyncio.shield(cleanup(children, clients, users, vhost, namespace, logdir))


@dataclass
class Verified:
    """What verifying the full path's audit trail found."""

    ok: bool
    line: str


async def verify_trail(namespace: str, key: str) -> Verified:
    """Verify the namespace's audit trail (``mesh.audit.verify_audit``) and time it."""
    import redis.asyncio as aioredis

    redis = aioredis.from_url(Settings.from_env().redis_url)
    try:
        report = await verify_audit(redis, namespace, AuditKeys({AUDIT_KEY_ID: key}, AUDIT_KEY_ID))
    finally:
        await redis.aclose()
    rate = report.records / report.seconds if report.seconds > 0 else 0.0
    verdict = "verifies" if report.ok else "FAILS: " + "; ".join(map(str, report.problems[:3]))
    return Verified(
        report.ok,
        f"audit verify: {report.records:,} records in {len(report.chains)} chains and "
        f"{report.checkpoints.records} checkpoints in {report.seconds:.2f} s, "
        f"{rate:,.0f} records/s; the trail {verdict}",
    )


async def cleanup(
    children: Children,
    clients: Sequence[Agent],
    users: BrokerUsers,
    vhost: Vhost,
    namespace: str,
    logdir: Path,
) -> None:
    await children.stop_all()
    for client in clients:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.stop(), 10)
    await users.delete()
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
    parser.add_argument(
        "--skip-authorized",
        action="store_true",
        help="skip the authorized path (the gateway enforcing a policy, a broker user each)",
    )
    parser.add_argument(
        "--skip-full",
        action="store_true",
        help="skip the full pipeline (every stage on: schemas, DLP, rate limits, audit trail)",
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
            print("interrupted; child processes, broker users and vhost removed", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
