"""The gateway under faults: random envelopes and payloads on both policy exchanges, and its
Redis stopped and started again under load.  Every message ends with exactly one audited
decision, nothing passes unaudited, and the gateway keeps going by itself."""

from __future__ import annotations

import asyncio
import json
import string
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from agents_reliability import Host, counts_are, drain, host, peek, subscriber, user_of
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from helpers import PrivateRedis, WireBytes, eventually, free_port, principals, running
from hypothesis import HealthCheck, Phase, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from behaviours import SubscriberBehaviour
from mesh import Message, Settings, on, topology
from mesh.audit import AuditEntry, AuditKeys, AuditReader, VerifyReport, verify_audit
from mesh.devservices import BrokerAdmin
from mesh.envelope import (
    CONTENT_TYPE,
    H_AUDIT,
    H_INSTANCE,
    H_MESH_ID,
    H_ON_BEHALF_OF,
    H_SCHEMA,
    H_TRACEPARENT,
    RESERVED_HEADERS,
)
from mesh.gateway import Gateway
from mesh.gateway.relay import InternalRelay, Relay

# --- the fuzz ---------------------------------------------------------------------------------

FUZZ_POLICY = """
principals:
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
  monitor: {kind: agent}
  ops: {kind: operator, agents: ["ops"]}
  bridge: {kind: bridge}
  dash: {kind: user}
  gateway: {kind: gateway}
rule_sets:
  telemetry:
    rules:
      - {allow: publish, who: vehicles, topics: "vehicle.{self}.#"}
      - {allow: publish, who: dash, topics: "vehicle.#"}
      - {allow: publish, who: ops, topics: "probe.#"}
      - {allow: subscribe, who: monitor, topics: "vehicle.#"}
      - {allow: request, who: [ops, vehicles], request: {agent: "v[0-9]*", operation: status}}
      - {allow: reply, who: "*", reply: {agent: "*"}}
      - {allow: control, who: ops, control: {agent: "*", command: "*"}}
  hardening:
    mode: audit
    rules:
      - {deny: publish, who: vehicles, topics: "vehicle.*.debug.#"}
schemas:
  definitions:
    reading:
      - version: 1
        inline:
          type: object
          properties: {vehicle: {type: string}, speed_kmh: {type: number}}
          required: [vehicle, speed_kmh]
    status:
      - version: 1
        inline: {type: object, properties: {verbose: {type: boolean}}}
  payloads:
    - topics: "vehicle.*.speed"
      accept: reading@1
    - request: {agent: "v[0-9]*", operation: status}
      accept: status
dlp:
  max_payload_bytes: 2048
  rules:
    - {detect: [phone, email], action: redact, topics: "vehicle.*.trip"}
    - {detect: card, action: block}
    - {detect: iban, action: alert}
rate_limits:
  vehicles: {who: vehicles, topics: "vehicle.#", rate: 2/s, burst: 3}
"""
"""Every stage has something to do: authorize (with an audit-mode rule set and a delegating
bridge), rate limits that bind under the fuzz's bursts, schemas, DLP (block, redact, alert,
size), registry indexing and reply bindings."""

BATCHES = 25
"""Hypothesis examples; each is a batch of up to ``BATCH`` messages (about 100 in all)."""
BATCH = 8
DECIDED_WITHIN = 20.0
"""Seconds a message may take to get its audit record (a loaded 2-core machine)."""

SENDERS = {"vehicles": "v7", "bridge": "bridge", "ops": "ops", "stranger": "stranger"}
"""Whose connection sends, and the agent id it would honestly claim; ``stranger`` is the
test's own broker user, which is no principal's."""

OWN = "<own>"
"""Drawn for ``reply_to``: the sender's own reply route."""
FIT = "<fit>"
"""The honest lane and type: the routing key's."""

SECRETS = (
    "4111 1111 1111 1111",
    "+44 20 7946 0958",
    "sam@example.com",
    "GB82 WEST 1234 5698 7654 32",
)

LANES = (topology.POLICY_EXCHANGE, topology.INTERNAL_POLICY_EXCHANGE)
PASSED = ("allowed", "redacted", "would-deny")

NAMES = st.sampled_from(["v7", "v8", "x", "i1", "ops", "gateway", "bridge", "_all"])
WORD = st.text(string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=8)
JUNK = st.text(max_size=40)

KEYS = st.one_of(
    st.sampled_from(
        [
            "vehicle.v7.speed",
            "vehicle.v7.trip",
            "vehicle.v7.pay",
            "vehicle.v7.debug.x",
            "vehicle.v8.speed",
            "vehicle.v7",
            "probe.fuzz",
            "weather.now",
        ]
    ),
    st.lists(WORD, min_size=1, max_size=5).map(".".join),
    st.builds("_req.{}.{}".format, NAMES, st.sampled_from(["status", "y"])),
    st.builds("_reply.{}.{}".format, NAMES, NAMES),
    st.builds("_err.{}.{}".format, NAMES, NAMES),
    st.builds("_ctl.{}.{}".format, NAMES, st.sampled_from(["ping", "stop", "start", "status"])),
    st.sampled_from(
        ["_registry.join", "_registry.leave", "_registry.behaviour", "_registry.x", "_registry"]
    ),
    st.sampled_from(["", "_", "#", "*", "vehicle.#", ".", "a..b", "_req.v7", "_x.y.z"]),
    JUNK,
)

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30))
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def _plant(value: Any, secret: str, key: str) -> Any:
    """``value`` with ``secret`` beside it (or in it, for a list)."""
    if isinstance(value, list):
        return [*value, secret]
    if isinstance(value, dict):
        return {**value, key: secret}
    return {key: secret, "other": value}


def _nest(depth: int, key: str, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = {key: leaf}
    return leaf


PAYLOADS = st.one_of(
    JSON,
    st.builds(_plant, JSON, st.sampled_from(SECRETS), st.text(max_size=12)),
    # deep or long-keyed objects: JSON paths of every length, secrets at the end of some
    st.builds(
        _nest,
        st.integers(1, 120),
        st.text(min_size=1, max_size=12) | st.integers(13, 1500).map("k".__mul__),
        st.sampled_from(SECRETS) | SCALARS,
    ),
    st.fixed_dictionaries(
        {"vehicle": st.just("v7") | st.text(max_size=5), "speed_kmh": st.integers() | st.floats()},
        optional={"extra": SCALARS},
    ),
    st.fixed_dictionaries({}, optional={"verbose": st.booleans() | SCALARS}),
    st.fixed_dictionaries(
        {"agent": st.sampled_from(["v7", "ops", "bridge", "x"]), "instance": st.just("i1") | JUNK}
    ),
)
BODIES = st.one_of(
    PAYLOADS.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"null", b'{"a":', b"\xff\xfe", b"[]", b'"text"']),
    # huge: generated as a size, so that hypothesis keeps little of it
    st.integers(2049, 300_000).map(lambda n: json.dumps({"blob": "x" * n}).encode()),
    st.integers(2049, 300_000).map(lambda n: bytes(range(256)) * (n // 256)),
    st.integers(500, 100_000).map(lambda n: b"[" * n + b"]" * n),
)


HEADER_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    # an AMQP float is 32 bits; RabbitMQ closes the connection of a NaN (INTERNAL_ERROR)
    | st.floats(width=32, allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.binary(max_size=20).map(bytearray)  # AMQP byte arrays
    | st.binary(min_size=1, max_size=20).map(WireBytes),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=6,
)
HEADERS = st.builds(
    lambda other, reserved, meaningful: {**other, **reserved, **meaningful},
    st.dictionaries(st.text(min_size=1, max_size=20), HEADER_VALUES, max_size=3),
    st.dictionaries(st.sampled_from(sorted(RESERVED_HEADERS)), HEADER_VALUES, max_size=3),
    st.fixed_dictionaries(
        {},
        optional={
            H_SCHEMA: st.sampled_from(["reading@1", "reading@2", "status@1", "nope"])
            | HEADER_VALUES,
            H_ON_BEHALF_OF: st.sampled_from(["dash", "vehicles", "nobody"]) | HEADER_VALUES,
            H_TRACEPARENT: st.just("00-" + "1" * 32 + "-" + "2" * 16 + "-01") | HEADER_VALUES,
        },
    ),
)


def _fitting_type(key: str) -> str:
    prefix = key.split(".", 1)[0]
    return {
        "_req": "request",
        "_reply": "reply",
        "_err": "error",
        "_ctl": "control",
    }.get(prefix, "event")


@dataclass(frozen=True)
class Envelope:
    """One message the fuzz sends, as it goes on the wire (its message id is made unique as
    it is sent, when it has one)."""

    sender: str
    lane: str
    key: str
    with_id: bool
    app_id: str | None
    user_id: bool
    """Whether it carries ``user_id`` (its connection's user: RabbitMQ refuses any other)."""
    type: str | None
    content_type: str | None
    correlation_id: str | None
    reply_to: str | None
    headers: dict[str, Any]
    body: bytes

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in self.__dataclass_fields__
            if name != "body"
        )
        more = "..." if len(self.body) > 60 else ""
        return f"Envelope({fields}, body={self.body[:60]!r}{more} ({len(self.body)} bytes))"

    def amqp(self, user: str, message_id: str) -> aio_pika.Message:
        message = aio_pika.Message(
            self.body,
            headers=self.headers,
            app_id=self.app_id,
            user_id=user if self.user_id else None,
            type=self.type,
            content_type=self.content_type,
            correlation_id=self.correlation_id,
            reply_to=self.reply_to,
        )
        message.message_id = message_id  # as it is (the constructor would make NO_ID a str)
        return message


HONEST: list[tuple[str, str, dict[str, Any]]] = [
    ("vehicles", "vehicle.v7.speed", {H_SCHEMA: "reading@1"}),
    ("vehicles", "vehicle.v7.trip", {}),
    ("vehicles", "vehicle.v7.pay", {}),
    ("vehicles", "vehicle.v7.debug.x", {}),
    ("vehicles", "_req.v8.status", {H_SCHEMA: "status@1"}),
    ("vehicles", "_registry.join", {}),
    ("vehicles", "_reply.ops.i1", {}),
    ("bridge", "vehicle.v7.trip", {H_ON_BEHALF_OF: "dash"}),
    ("ops", "probe.fuzz", {}),
    ("ops", "_req.v7.status", {H_SCHEMA: "status@1"}),
    ("ops", "_ctl.v7.ping", {}),
    ("ops", "_ctl.gateway.ping", {}),
]
"""What senders may well send: (sender, routing key, headers).  Each envelope starts as one
of these, sent honestly, and has a few of its fields replaced by random ones (``MUTATIONS``),
or many: none, and it is likely to pass; all, and it is noise.

Not sent: property strings (ids, ``app_id``, type, routing key) or header names that are
not UTF-8, and header tables nested deeper than Python's recursion limit.  aiormq cannot
parse such a frame: it drops the gateway's connection before the gateway sees the message,
and the broker delivers it again after the reconnect.  Nor NaN header floats, on which
RabbitMQ closes the sender's connection."""

MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "sender": st.sampled_from(sorted(SENDERS)),
    "key": KEYS,
    "lane": st.sampled_from(LANES),
    "with_id": st.just(False),
    "app_id": st.sampled_from([None, "v8", "monitor", "bridge", "ops", "gateway"]) | JUNK,
    "user_id": st.just(False),
    "type": st.sampled_from([None, "event", "request", "reply", "error", "control"])
    | st.text(max_size=12),
    "content_type": st.sampled_from([None, "text/plain"]) | st.text(max_size=20),
    "correlation_id": st.none() | st.text(max_size=40),
    "reply_to": st.sampled_from([None, "_reply.v8.i1", "_reply.v7.i1"]) | JUNK,
    "instance": st.sampled_from([None, 7]) | JUNK,
    "headers": HEADERS,
    "body": BODIES,
}


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    sender, key, headers = draw(st.sampled_from(HONEST))
    wants_reply = key.startswith(("_req.", "_ctl."))
    fields: dict[str, Any] = {
        "sender": sender,
        "key": key,
        "lane": FIT,
        "with_id": True,
        "app_id": SENDERS[sender],
        "user_id": True,
        "type": FIT,
        "content_type": CONTENT_TYPE,
        "correlation_id": "c0ffee" if wants_reply else None,
        "reply_to": OWN if wants_reply else None,
        "instance": "i1",
        "headers": {},
        "body": draw(PAYLOADS.map(lambda value: json.dumps(value).encode())),
    }
    names = st.sampled_from(sorted(MUTATIONS))
    for name in draw(st.sets(names, max_size=2) | st.sets(names, min_size=5)):
        fields[name] = draw(MUTATIONS[name])
    headers = {**headers, **fields.pop("headers")}
    instance = fields.pop("instance")
    if instance is not None:
        headers[H_INSTANCE] = instance
    if fields["lane"] == FIT:
        fields["lane"] = topology.policy_exchange(fields["key"])
    if fields["type"] == FIT:
        fields["type"] = _fitting_type(fields["key"])
    if fields["reply_to"] == OWN:
        fields["reply_to"] = f"_reply.{fields['app_id']}.{instance}"
    return Envelope(headers=headers, **fields)


def _honest(sender: str, key: str, body: Any, **headers: Any) -> Envelope:
    return Envelope(
        sender=sender,
        lane=topology.policy_exchange(key),
        key=key,
        with_id=True,
        app_id=SENDERS[sender],
        user_id=True,
        type=_fitting_type(key),
        content_type=CONTENT_TYPE,
        correlation_id=None,
        reply_to=None,
        headers={H_INSTANCE: "i1", **headers},
        body=json.dumps(body).encode(),
    )


REGRESSIONS = [
    # a finding whose JSON path is longer than an audit record keeps
    _honest("vehicles", "vehicle.v7.trip", {"k" * 1100: {"mail": "sam@example.com"}}),
    _honest("vehicles", "vehicle.v7.pay", {"k" * 1100: "4111 1111 1111 1111"}),
    # a header string that is not UTF-8
    _honest("ops", "probe.fuzz", {"n": 0}, note=WireBytes(b"\xff")),
]
"""Messages the fuzz found the gateway failing on, sent first each run."""


class _NoId(str):
    """An empty ``message_id`` that aiormq leaves alone: it gives every message without one
    (``not message_id``) a random id of its own, so this is how the fuzz sends a message
    without an id.  The gateway reads it as ``""``, which its decode stage refuses as it
    would a missing id."""

    def __bool__(self) -> bool:
        return True


NO_ID = _NoId("")


class Fuzz:
    """Sends envelopes as their senders, and sees what the gateway decided and relayed.

    Decisions are read from the audit trail; relayed copies from a tap on each delivery
    exchange (bound ``#``), by the sender's message id they carry (``x-mesh-id``).
    """

    def __init__(self, settings: Settings, redis: aioredis.Redis, gateway: Gateway) -> None:
        self.reader = AuditReader(redis, settings.namespace)
        self.gateway = gateway
        self.channels: dict[str, AbstractChannel] = {}
        self.users: dict[str, str] = {}
        self.sent: dict[str, Envelope] = {}
        """Every message sent with an id, by its id."""
        self.without_id: list[Envelope] = []
        self.copies: dict[str, list[str | None]] = defaultdict(list)
        """The audit id each relayed copy names, by the sender's message id."""
        self.probes = 0

    async def connect(
        self, stack: AsyncExitStack, sender: str, settings: Settings
    ) -> AbstractConnection:
        connection = await aio_pika.connect(settings.amqp_url)
        await stack.enter_async_context(connection)
        self.channels[sender] = await connection.channel()
        self.users[sender] = user_of(settings)
        return connection

    async def tap(self, connection: AbstractConnection) -> None:
        channel = await connection.channel()
        for exchange in (topology.TOPIC_EXCHANGE, topology.INTERNAL_EXCHANGE):
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, "#")
            await queue.consume(self._copy, no_ack=True)

    async def _copy(self, incoming: AbstractIncomingMessage) -> None:
        headers = incoming.headers or {}
        sender_id = headers.get(H_MESH_ID)
        if isinstance(sender_id, str):
            audit = headers.get(H_AUDIT)
            self.copies[sender_id].append(audit if isinstance(audit, str) else None)

    async def send(self, envelope: Envelope) -> str | None:
        message_id = uuid.uuid4().hex if envelope.with_id else None
        exchange = await self.channels[envelope.sender].get_exchange(envelope.lane)
        message = envelope.amqp(self.users[envelope.sender], message_id or NO_ID)
        await exchange.publish(message, envelope.key)
        if message_id is None:
            self.without_id.append(envelope)
        else:
            self.sent[message_id] = envelope
        return message_id

    async def entries(self) -> list[AuditEntry]:
        return [entry async for entry in self.reader.entries()]

    async def counts(self) -> Counter[str | None]:
        """Audit records by message id; those of messages without one under ``None``."""
        return Counter(entry.record.message_id or None for entry in await self.entries())

    async def check(self, batch: list[Envelope]) -> None:
        """Send ``batch``; each message gets one audited decision, and the gateway still
        relays a well-formed message afterwards."""
        ids = [await self.send(envelope) for envelope in batch]

        async def decided() -> bool:
            counts = await self.counts()
            undecided = [e for i, e in zip(ids, batch, strict=True) if i and not counts[i]]
            assert not undecided, f"no audit record (yet) of {undecided}"
            assert counts[None] >= len(self.without_id), "a message without id has no record"
            return True

        async def relayed_as_decided() -> bool:
            mine = set(ids) - {None}
            self.check_relayed(e for e in await self.entries() if e.record.message_id in mine)
            return True

        await eventually(decided, timeout=DECIDED_WITHIN, interval=0.05)
        await eventually(relayed_as_decided, timeout=DECIDED_WITHIN, interval=0.05)
        await self.probe()
        counts = await self.counts()
        twice = [(counts[i], e) for i, e in zip(ids, batch, strict=True) if i and counts[i] > 1]
        assert not twice, f"more than one audit record of {twice}"
        assert counts[None] == len(self.without_id), "messages without id: records"
        for name in (Relay.name, InternalRelay.name):
            assert self.gateway.behaviour_map[name].is_running, f"{name} stopped"

    def check_relayed(self, entries: Iterable[AuditEntry]) -> None:
        """What passed was relayed once, its copy naming its record; nothing else was."""
        for entry in entries:
            message_id = entry.record.message_id
            assert message_id is not None
            copies = self.copies.get(message_id, [])
            expected = [f"{entry.chain}/{entry.id}"] if entry.record.decision in PASSED else []
            assert copies == expected, (
                f"{entry.record.decision} ({entry.record.stage}: {entry.record.reason}) "
                f"{self.sent[message_id]} relayed as {copies}"
            )

    async def probe(self) -> None:
        """A well-formed event passes and is relayed, naming its audit record."""
        self.probes += 1
        message_id = uuid.uuid4().hex
        probe = aio_pika.Message(
            json.dumps({"n": self.probes}).encode(),
            headers={H_INSTANCE: "i1"},
            message_id=message_id,
            app_id="ops",
            user_id=self.users["ops"],
            type="event",
            content_type=CONTENT_TYPE,
        )
        exchange = await self.channels["ops"].get_exchange(topology.POLICY_EXCHANGE)
        await exchange.publish(probe, "probe.fuzz")
        await eventually(lambda: message_id in self.copies, timeout=DECIDED_WITHIN)
        [audit_id] = self.copies[message_id]
        assert audit_id is not None, "the probe was relayed without its audit record's id"

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        """The property, driven by hypothesis in this (worker) thread; each example's check
        runs in ``loop``, where the gateway and the connections live."""

        @hypothesis_settings(
            max_examples=BATCHES,
            deadline=None,
            database=None,
            # No shrinking: each failing try would wait out DECIDED_WITHIN; the batch that
            # failed is reported as generated.
            phases=[Phase.explicit, Phase.generate],
            print_blob=True,
            suppress_health_check=list(HealthCheck),
        )
        @example(REGRESSIONS)
        @given(st.lists(envelopes(), min_size=1, max_size=BATCH))
        def every_message_gets_one_decision(batch: list[Envelope]) -> None:
            asyncio.run_coroutine_threadsafe(self.check(batch), loop).result()

        every_message_gets_one_decision()


async def test_random_envelopes_each_get_one_audited_decision(
    settings: Settings, redis: aioredis.Redis, admin: BrokerAdmin, tmp_path: Path
) -> None:
    """Random messages into both policy exchanges, from senders honest and not: the gateway
    never fails, each message gets exactly one audit record, what passed is relayed once
    naming that record, what was denied is not relayed, and nothing is dead-lettered.

    Hypothesis draws batches of messages (``envelopes``), in a worker thread, while the
    gateway and the connections run in the test's event loop: each example hands its
    batch to the loop (``run_coroutine_threadsafe``) and waits for the verdict, so the
    gateway starts once for all examples, hypothesis keeps its own control of examples
    and failures, and no pytest fixture is shared between examples.  After the last,
    once both gateway queues hold nothing unacknowledged, every decision is final and
    is checked again as a whole.
    """
    policy = tmp_path / "policy.yaml"
    policy.write_text(FUZZ_POLICY)
    async with principals(settings, policy) as settings_for:
        gateway = Gateway(settings=await settings_for("gateway"))
        fuzz = Fuzz(settings, redis, gateway)
        async with running(gateway), peek(settings) as broker, AsyncExitStack() as stack:
            for sender in ("vehicles", "bridge", "ops"):
                await fuzz.connect(stack, sender, await settings_for(sender))
            await fuzz.tap(await fuzz.connect(stack, "stranger", settings))

            await asyncio.to_thread(fuzz.run, asyncio.get_running_loop())

            async def settled() -> bool:
                # Every message acked: no decision is still to come, nor a second one.
                for queue in (topology.GATEWAY_QUEUE, topology.INTERNAL_GATEWAY_QUEUE):
                    if not await counts_are(admin, settings, queue, ready=0, unacked=0):
                        return False
                return True

            await eventually(settled, timeout=30, interval=0.5)
            entries = await fuzz.entries()
            records = Counter(entry.record.message_id or None for entry in entries)
            assert {i: n for i, n in records.items() if i in fuzz.sent and n != 1} == {}
            assert fuzz.sent.keys() <= records.keys()
            assert records[None] == len(fuzz.without_id)
            fuzz.check_relayed(e for e in entries if e.record.message_id in fuzz.sent)
            assert await broker.dead_letters_through_marker() == []


# --- Redis stopped and started again under load -----------------------------------------------

LOAD_POLICY = """
principals:
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
  monitor: {kind: agent}
  gateway: {kind: gateway}
rule_sets:
  telemetry:
    rules:
      - {allow: publish, who: vehicles, topics: "vehicle.{self}.#"}
      - {allow: subscribe, who: monitor, topics: "vehicle.#"}
"""
NEVER_BINDING = """
rate_limits:
  telemetry: {who: vehicles, topics: "vehicle.#", rate: 100000/s}
"""

PHASE = 100
"""Events sent before Redis stops (about), while it is stopped, and once it is back."""
PACE = 0.005
"""Seconds between two events: a steady stream rather than one burst."""


class Watch(SubscriberBehaviour):
    @on("vehicle.#")
    async def reading(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


@asynccontextmanager
async def durable_redis(workdir: Path) -> AsyncIterator[PrivateRedis]:
    """A private ``redis-server`` that keeps what it acknowledged across a kill, as a
    production Redis with an append-only file does: the audit records written before the
    stop must still be there to check."""
    server = PrivateRedis(free_port(), workdir, durable=True)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


@pytest.mark.parametrize("holding", ["audit", "rate-limit"])
async def test_redis_stopped_and_restarted_under_load(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, holding: str
) -> None:
    """The whole mesh on a Redis of its own, killed while a vehicle streams events and
    started again: the gateway holds what it has (the gate closes), relays nothing while
    Redis is gone, and resumes by itself; the subscriber gets every event.

    Each stage that needs Redis must hold a message back on its own, and the first one
    to fail does: so one run has the audit trail and no rate limit (each copy must name an
    audit record of its event, and the trail must verify), the other a rate limit that
    never binds and no audit trail (its decisions are logged only).
    """
    audited = holding == "audit"
    policy = tmp_path / "policy.yaml"
    policy.write_text(LOAD_POLICY if audited else LOAD_POLICY + NEVER_BINDING)
    if not audited:
        settings = settings.model_copy(update={"audit_key": None})
    async with durable_redis(tmp_path) as server, principals(settings, policy) as settings_for:

        async def on_server(principal: str) -> Settings:
            return (await settings_for(principal)).model_copy(update={"redis_url": server.url})

        gateway = Gateway(settings=await on_server("gateway"))
        monitor = subscriber(await on_server("monitor"), Watch, agent_id="monitor")
        v7 = Host("v7", settings=await on_server("vehicles"))
        published: list[str] = []
        delivered: dict[str, list[Message]] = defaultdict(list)
        stopped, back = asyncio.Event(), asyncio.Event()

        def deliveries() -> int:
            for msg in drain(monitor.seen):
                delivered[msg.message_id].append(msg)
            return len(delivered)

        async def stream() -> None:
            for n in range(3 * PHASE):
                if n == PHASE:
                    await stopped.wait()
                elif n == 2 * PHASE:
                    await back.wait()
                published.append(await v7.publish("vehicle.v7.speed", {"n": n}))
                await asyncio.sleep(PACE)

        async with running(gateway, monitor, v7):
            publisher = asyncio.create_task(stream())
            try:
                await eventually(lambda: deliveries() >= PHASE // 2, timeout=30)
                await server.kill()
                killed_at = len(published)
                stopped.set()
                await eventually(lambda: not gateway.gate.is_open, timeout=30)
                await eventually(lambda: len(published) >= 2 * PHASE, timeout=30)
                deliveries()
                sent_while_down = set(published[killed_at:])
                assert len(sent_while_down) >= PHASE
                assert not sent_while_down & delivered.keys(), "passed while Redis was gone"
                await server.start()
                back.set()
                await eventually(lambda: gateway.gate.is_open, timeout=30)
                await publisher
                await eventually(lambda: deliveries() >= len(published), timeout=60)
            finally:
                publisher.cancel()
            assert delivered.keys() == set(published)
            for name in (Relay.name, InternalRelay.name):
                assert gateway.behaviour_map[name].is_running

        copies = [copy for copies in delivered.values() for copy in copies]
        if audited:
            report = await check_audited(server, settings, copies)
            assert report.ok, report.problems
        else:
            assert {copy.audit_id for copy in copies} == {None}
    assert "Redis unreachable" in caplog.text
    assert "Redis answers again" in caplog.text


async def check_audited(
    server: PrivateRedis, settings: Settings, copies: list[Message]
) -> VerifyReport:
    """Each copy names the audit record of its event's allowance; the trail's verification."""
    client = aioredis.Redis.from_url(server.url)
    try:
        trail = {
            f"{entry.chain}/{entry.id}": entry.record
            async for entry in AuditReader(client, settings.namespace).entries()
        }
        for copy in copies:
            assert copy.audit_id is not None, f"{copy.message_id} passed unaudited"
            record = trail[copy.audit_id]
            assert (record.message_id, record.decision) == (copy.message_id, "allowed")
        ids = {copy.message_id for copy in copies}
        assert {r.decision for r in trail.values() if r.message_id in ids} == {"allowed"}
        return await verify_audit(client, settings.namespace, AuditKeys.from_settings(settings))
    finally:
        await client.aclose()
