"""The live stream: one queue of the bridge's, bound to what its clients subscribe to, fanned
out in the bridge's process to each client whose patterns match.

One queue for all clients, not one per client: the broker copies each message once to the
bridge however many clients want it, and a client costs no queue (a broker keeps a few
thousand at most).  The queue (``mesh.i.<bridge>.<instance>._stream``, the bridge's own name
space) binds the union of the clients' patterns on ``mesh.topic``, each bound while some
client holds it, and ``_registry.*`` on ``mesh.internal`` while some client watches agents.
The broker lets the bridge's user bind exactly what its users may subscribe to (provisioning
gives a delegating principal its users' subscribe patterns), and the policy is asked per
client before anything is bound.  Each message is turned into its JSON frame once and
offered to the matching clients' outboxes (``Outbox``), which never wait.

The queue keeps at most ``stream_queue_length`` messages and drops the oldest when the
bridge falls behind: a live view's copy is disposable, and agents' own queues lose nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pydantic_core
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue
from aiormq.exceptions import ChannelAccessRefused

from mesh import topology
from mesh.agent import Agent
from mesh.bridge.access import Access
from mesh.bridge.auth import Caller
from mesh.bridge.errors import ApiError
from mesh.bridge.outbox import Outbox
from mesh.bridge.outcomes import Outcomes
from mesh.envelope import H_ON_BEHALF_OF, EnvelopeError, Message, from_amqp
from mesh.registry import InstanceRecord
from mesh.transport import settle

logger = logging.getLogger(__name__)

REGISTRY_EVENTS = topology.registry_key("*")

PREFETCH = 1000

QUEUE_EXPIRES_MS = 60_000
"""A stream queue left behind by a bridge that died goes after a minute unused."""


@dataclass(eq=False)
class Subscriber:
    """One client of the live stream: who it is, what it subscribed to, its outbox."""

    caller: Caller
    outbox: Outbox
    patterns: set[str] = field(default_factory=set)
    agents: bool = False
    """Whether it receives registry events (agents joining, leaving, changing)."""
    seen: set[str] = field(default_factory=set)
    """Agents it was shown an event of: it hears when they leave."""

    def wants(self, topic: str) -> bool:
        return any(topology.matches(p, topic) for p in self.patterns)


def message_frame(message: Message) -> dict[str, Any]:
    """What a client receives for one message on the mesh."""
    return {
        "type": "message",
        "topic": message.topic,
        "message_id": message.message_id,
        "sender": message.app_id,
        "instance": message.instance,
        "user": message.user_id,
        "on_behalf_of": _text(message.headers.get(H_ON_BEHALF_OF)),
        "timestamp": message.timestamp.isoformat() if message.timestamp else None,
        "schema": message.schema_id,
        "audit_id": message.audit_id,
        "redacted": list(message.redacted),
        "payload": message.payload,
    }


def agent_frame(message: Message) -> dict[str, Any]:
    """What a client receives for one registry event: ``join`` and ``behaviour`` carry the
    instance's record, ``leave`` only its names."""
    body = message.payload if isinstance(message.payload, dict) else {}
    event = message.topic.rsplit(".", 1)[-1]
    frame: dict[str, Any] = {
        "type": "agent",
        "event": event,
        "agent": body.get("agent"),
        "instance": body.get("instance"),
    }
    if event != "leave":
        frame["record"] = body
    return frame


class Stream:
    """The bridge's stream queue and its clients."""

    def __init__(self, agent: Agent, access: Access, outcomes: Outcomes, length: int) -> None:
        self.agent = agent
        self.access = access
        self.outcomes = outcomes
        self.length = length
        self.subscribers: set[Subscriber] = set()
        self.dropped_slow = 0
        """Clients disconnected because their outbox overflowed, since the start."""
        self._bound: Counter[str] = Counter()
        self._lock = asyncio.Lock()
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractRobustQueue | None = None
        self._consumer: str | None = None
        self._leaving: set[asyncio.Task[None]] = set()

    @property
    def queue_name(self) -> str:
        return f"mesh.i.{self.agent.id}.{self.agent.instance}._stream"

    @property
    def bound(self) -> list[str]:
        """The binding keys of the stream queue now."""
        return sorted(self._bound)

    async def start(self) -> None:
        self._channel = await self.agent.transport.open_channel(PREFETCH, confirms=False)
        queue = await self._channel.declare_queue(
            self.queue_name,
            arguments={
                "x-queue-type": "classic",
                "x-max-length": self.length,
                "x-overflow": "drop-head",
                "x-expires": QUEUE_EXPIRES_MS,
            },
        )
        assert isinstance(queue, AbstractRobustQueue)
        self._queue = queue
        self._consumer = await queue.consume(self._on_message)

    async def stop(self) -> None:
        for subscriber in self.subscribers:
            subscriber.outbox.close()
        await asyncio.gather(*self._leaving, return_exceptions=True)
        if self._queue is not None:
            if self._consumer is not None:
                await settle(self._queue.cancel(self._consumer))
            await settle(self._queue.delete(if_unused=False, if_empty=False))
        if self._channel is not None:
            await settle(self._channel.close())
        self._queue = self._channel = self._consumer = None

    # Clients

    def join(self, caller: Caller, outbox: Outbox) -> Subscriber:
        subscriber = Subscriber(caller, outbox)
        self.subscribers.add(subscriber)
        return subscriber

    def leave(self, subscriber: Subscriber) -> None:
        """``subscriber`` is gone: unbind what only it held, in a task of the stream's own (a
        client's task may be cancelled while it cleans up)."""
        if subscriber not in self.subscribers:
            return
        self.subscribers.discard(subscriber)
        subscriber.outbox.close()
        self.outcomes.forget(subscriber.outbox.report)
        keys = list(subscriber.patterns) + ([REGISTRY_EVENTS] if subscriber.agents else [])
        subscriber.patterns.clear()
        subscriber.agents = False
        task = asyncio.get_running_loop().create_task(self._unbind(keys))
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def subscribe(
        self, subscriber: Subscriber, patterns: Iterable[str], *, agents: bool = False
    ) -> None:
        """Bind what ``subscriber`` newly subscribes to; the caller checked the policy."""
        new = [p for p in dict.fromkeys(patterns) if p not in subscriber.patterns]
        keys = new + ([REGISTRY_EVENTS] if agents and not subscriber.agents else [])
        await self._bind(keys)
        subscriber.patterns.update(new)
        subscriber.agents = subscriber.agents or agents

    async def unsubscribe(
        self, subscriber: Subscriber, patterns: Iterable[str], *, agents: bool = False
    ) -> None:
        gone = [p for p in dict.fromkeys(patterns) if p in subscriber.patterns]
        subscriber.patterns.difference_update(gone)
        keys = gone + ([REGISTRY_EVENTS] if agents and subscriber.agents else [])
        subscriber.agents = subscriber.agents and not agents
        await self._unbind(keys)

    async def _bind(self, keys: list[str]) -> None:
        async with self._lock:
            new = [key for key in dict.fromkeys(keys) if not self._bound[key]]
            if new:
                queue = self._require_queue()
                try:
                    await self._try(new)
                    for key in new:
                        # Bound already (by the try); bound here as well so that the robust
                        # queue binds it again after a reconnection.
                        await queue.bind(topology.delivery_exchange(key), key)
                except BaseException:
                    for key in new:  # all or none
                        await settle(queue.unbind(topology.delivery_exchange(key), key))
                    raise
            self._bound.update(keys)

    async def _try(self, keys: list[str]) -> None:
        """Bind ``keys`` on a channel of its own, which a refusal closes.

        On the stream's own channel a refusal would close it, and with it the consumer,
        until aio-pika reopened it.  The broker lets the bridge's user bind exactly what
        its users may subscribe to as provisioned, which a newer policy may exceed.
        """
        connection = self.agent.transport.connection.transport
        if connection is None:
            raise ApiError(503, "the bridge is not connected to the broker")
        channel = await connection.connection.channel()
        try:
            for key in keys:
                try:
                    await channel.queue_bind(
                        self.queue_name, topology.delivery_exchange(key), routing_key=key
                    )
                except ChannelAccessRefused:
                    raise ApiError(
                        403,
                        f"the broker refused to bind {key!r} for the bridge's user: provision "
                        "the bridge for its users' subscriptions (mesh provision policy.yaml)",
                        stage="broker",
                    ) from None
        finally:
            await settle(channel.close())

    async def _unbind(self, keys: list[str]) -> None:
        async with self._lock:
            for key in keys:
                self._bound[key] -= 1
                if self._bound[key] <= 0:
                    del self._bound[key]
                    if self._queue is not None:
                        await settle(self._queue.unbind(topology.delivery_exchange(key), key))

    def _require_queue(self) -> AbstractRobustQueue:
        if self._queue is None:
            raise RuntimeError("the bridge's stream is not running")
        return self._queue

    # Fan-out

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        try:
            self.fan_out(from_amqp(incoming))
        except EnvelopeError as exc:
            logger.warning("stream: dropping malformed message %s: %s", incoming.message_id, exc)
        finally:
            await settle(incoming.ack())

    def fan_out(self, message: Message) -> None:
        """Offer ``message`` to every client that wants it; waits for none."""
        if message.app_id == self.agent.id:
            self.outcomes.relayed(message)
        if message.topic.startswith("_registry."):
            self._registry_event(message)
            return
        frame: str | None = None
        for subscriber in self.subscribers:
            if subscriber.wants(message.topic):
                if frame is None:
                    frame = _json(message_frame(message))
                subscriber.outbox.offer(frame)

    def _registry_event(self, message: Message) -> None:
        frame = agent_frame(message)
        agent = str(frame["agent"])
        record = _record(frame.get("record"))
        text = _json(frame)
        for subscriber in self.subscribers:
            if not subscriber.agents:
                continue
            if record is None:  # a leave: it names the instance, nothing more
                shown = agent in subscriber.seen
            else:
                shown = self.access.may_see(subscriber.caller, agent, [record])
                if shown:
                    subscriber.seen.add(agent)
            if shown:
                subscriber.outbox.offer(text)


def _record(body: Any) -> InstanceRecord | None:
    try:
        return InstanceRecord.model_validate(body) if body else None
    except ValueError:
        return None


def _json(frame: dict[str, Any]) -> str:
    return pydantic_core.to_json(frame, fallback=str).decode()


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None
