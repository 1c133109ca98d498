"""Agent: a process-level mode.Service that hosts behaviours on one AMQP connection."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
from aiormq.exceptions import ChannelAccessRefused
from mode import Service
from pydantic import BaseModel, ValidationError
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from mesh import logcontext, topology
from mesh.behaviour import Behaviour, collect_routes
from mesh.bindings import Binding, BindingLedger
from mesh.config import Settings
from mesh.deadletter import DeadLetters
from mesh.envelope import (
    EnvelopeError,
    Message,
    MessageType,
    error_of,
    from_amqp,
    to_amqp,
)
from mesh.idempotency import HandledIds
from mesh.membership import REDIS_DOWN, Membership
from mesh.metrics import Metrics
from mesh.registry import AgentRecord, BehaviourRecord, InstanceRecord, Registry
from mesh.retry import Retries
from mesh.state import Change, StateError, StateSlot, StateStore, as_change
from mesh.tls import redis_tls_options
from mesh.transport import Transport, settle

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class RequestTimeout(TimeoutError):
    """No reply arrived in time; the request may still be handled later."""


class RemoteError(RuntimeError):
    """The remote handler failed, refused the request, or nobody serves the operation."""

    def __init__(self, agent: str, operation: str, error_type: str, detail: str) -> None:
        super().__init__(f"{agent}.{operation} failed: {error_type}: {detail}")
        self.agent = agent
        self.operation = operation
        self.error_type = error_type
        self.detail = detail


class AgentStopped(RuntimeError):
    """The agent stopped while a request was waiting for its reply."""


GATEWAY_CAPABILITY = "gateway"
"""The capability gateways register with (they answer ``ping`` only to their own id)."""

CONTROL_COMMANDS = frozenset({"ping", "start_behaviour", "stop_behaviour", "shutdown"})

STARTS_AT_ONCE = 64
"""Behaviours an agent starts concurrently (each opens a channel and declares a queue)."""

LIVENESS_CACHE = 1.0
"""Seconds a requester trusts that an agent it found in the registry is still there."""

INDEXED_WITHIN = 5.0
"""Seconds a starting agent waits for a live gateway to index it for discovery."""

LEAVE_WITHIN = 5.0
"""Seconds a stopping agent gives its deregistration and ``leave`` event at most (and no
more than ``shutdown_timeout``): a publish would wait ``publish_timeout`` for a RabbitMQ
that is down."""


@dataclass
class _Awaited:
    """Replies this instance waits for under one correlation id, and whom it asked."""

    agent: str
    replies: asyncio.Queue[Message | None] = field(default_factory=asyncio.Queue)
    """``None`` when the agent stops."""
    answered: set[tuple[str | None, str | None]] = field(default_factory=set)

    def accepts(self, message: Message) -> bool:
        """Whether ``message`` answers this: from the agent asked, or the gateway; once each.

        A notice the gateway publishes itself (``Unroutable``, ``Denied``) carries no
        ``x-mesh-user``: everything that passed the gateway on a sender's behalf does.
        """
        from_gateway = message.user_id is None and message.type is MessageType.ERROR
        asked = self.agent in (topology.ALL_AGENTS, message.app_id)
        sender = (message.app_id, message.instance)
        if not (from_gateway or asked) or sender in self.answered:
            return False
        self.answered.add(sender)
        return True


class RPCBehaviour(Behaviour):
    """Serves the ``@rpc`` operations declared on the agent class itself."""

    name = "rpc"
    kind = "rpc"
    max_concurrency = 8

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.routes = collect_routes(agent)
        self._operations = {r.spec.operation: r for r in self.routes if r.spec.operation}

    async def declare_queue(self, channel: AbstractRobustChannel) -> AbstractQueue:
        return await topology.declare_request_queue(
            channel, self.queue_name, self.agent.settings.request_queue_expires
        )

    @property
    def bindings(self) -> list[Binding]:
        return [Binding(topology.delivery_exchange(key), key) for key in self.binding_keys]


class Agent(Service):
    """An agent instance: behaviours, a connection, an inbox for replies and control.

    Subclass it, list ``behaviours`` and ``capabilities``, declare ``@rpc`` methods,
    and run it with ``mesh run module:Class --id NAME`` or ``async with Agent(...)``.
    """

    capabilities: ClassVar[list[str]] = []
    behaviours: ClassVar[list[type[Behaviour]]] = []
    version: ClassVar[str] = "0"
    state_model: ClassVar[type[BaseModel] | None] = None
    """The pydantic model of ``self.state``, kept in Redis and restored on start."""
    registered: ClassVar[bool] = True
    """Whether instances appear in the registry."""
    controllable: ClassVar[bool] = True
    """Whether instances answer control commands (ping, start/stop, shutdown)."""
    control_commands: ClassVar[frozenset[str]] = CONTROL_COMMANDS
    """The control commands instances accept over the mesh."""
    broadcast_control: ClassVar[bool] = True
    """Whether instances also take commands sent to every agent (``_all``)."""
    indexes_registry: ClassVar[bool] = False
    """Whether instances keep the registry's shared indexes (gateways only): an agent's
    entry there is written by a gateway when its registry event passes."""

    def __init__(
        self,
        id: str,
        *,
        settings: Settings | None = None,
        instance: str | None = None,
    ) -> None:
        self.id = topology.check_name("agent id", id)
        self.instance = topology.check_name("instance id", instance or uuid.uuid4().hex[:8])
        self.settings = settings or Settings.from_env()
        self.shutdown_timeout = self.settings.shutdown_timeout
        self.metrics = Metrics()
        self.transport = Transport(self.settings, f"{self.id}/{self.instance}", self.metrics)
        self.dead_letters = DeadLetters(self.transport, self.id)
        self.retries = Retries(self.transport, self.id)
        self.started_at = datetime.now(UTC)
        # One attempt per call, whatever the URL asks: each redis-py retry waits a timeout more,
        # and the callers retry themselves (heartbeats) or must know the call failed (state).
        self.redis = aioredis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=self.settings.heartbeat_interval,
            socket_connect_timeout=self.settings.heartbeat_interval,
            retry=RedisRetry(NoBackoff(), 0),
            **redis_tls_options(self.settings),
        )
        self.registry = Registry(self.redis, self.settings.namespace, self.settings.heartbeat_ttl)
        self.state_store = StateStore(self.redis, self.settings.namespace)
        self.bindings_ledger = BindingLedger(self.redis, self.settings.namespace)
        self.handled_ids = HandledIds(
            self.redis,
            self.settings.namespace,
            window=self.settings.idempotency_window,
            lease=self.settings.shutdown_timeout,
        )
        self._state = (
            StateSlot(self.state_store, self.state_store.key(self.id), self.state_model)
            if self.state_model is not None
            else None
        )
        self._membership = Membership(
            self.registry,
            self.describe,
            self._announce,
            self.settings.heartbeat_interval,
            indexes_itself=self.indexes_registry,
        )
        self._membership_tasks: set[asyncio.Task[None]] = set()
        self._leaving = False
        self._serving = False
        self._joined = False
        self._stopping_task: asyncio.Task[None] | None = None
        self.behaviour_map: dict[str, Behaviour] = {}
        self._awaited: dict[str, _Awaited] = {}
        self._alive_until: dict[str, float] = {}
        self._inbox_channel: AbstractRobustChannel | None = None
        self._inbox_generation = 0
        super().__init__()
        if not self.registered and any(r.spec.operation for r in collect_routes(self)):
            raise ValueError(
                f"{type(self).__name__} serves @rpc operations but is not registered: callers "
                "look an agent up in the registry before they send it a request"
            )
        for cls in self._behaviour_classes():
            behaviour = cls(self)
            if behaviour.name in self.behaviour_map:
                raise ValueError(f"{type(self).__name__}: two behaviours named {behaviour.name!r}")
            self.behaviour_map[behaviour.name] = behaviour

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}/{self.instance}>"

    def _behaviour_classes(self) -> list[type[Behaviour]]:
        classes = list(self.behaviours)
        if any(r.spec.operation for r in collect_routes(self)):
            classes.append(RPCBehaviour)
        return classes

    @property
    def reply_to(self) -> str:
        return topology.reply_key(self.id, self.instance)

    # --- lifecycle -----------------------------------------------------------------

    @property
    def unready(self) -> str | None:
        """Why this instance is not ready to take work (``/readyz``); ``None`` once it is
        started (connected, consuming, registered) and neither draining nor cut off from
        RabbitMQ or Redis."""
        if self._leaving:
            return "draining"
        if not self._serving:
            return "starting"
        if not self.transport.connected:
            return "RabbitMQ unreachable: reconnecting"
        if self.registered and self._membership.redis_down:
            return "Redis unreachable"
        if self.registered and not self._membership.registered:
            return "not registered"
        return None

    async def on_start(self) -> None:
        logcontext.agent_id.set(self.id)
        self._leaving = self._serving = False
        self.started_at = datetime.now(UTC)
        await self.transport.connect()
        await self._ensure_topology()
        await self._declare_requeue_exchange()
        await self._open_inbox()
        if self._state is not None:
            await self._state.try_restore()
        await self._start_behaviours()
        if self.registered:
            self._joined = True
            await self._membership.join()
            await self._until_indexed()
            self.add_future(self._membership.run())
        self._serving = True
        logger.info(
            "agent %s/%s started with behaviours %s",
            self.id,
            self.instance,
            ", ".join(self.behaviour_map) or "(none)",
        )

    async def _until_indexed(self) -> None:
        """Wait until a gateway has indexed this instance, so that discovery finds it once
        the start returns; with no gateway live, nobody will until one runs."""
        if self.indexes_registry or not self._membership.registered:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INDEXED_WITHIN
        try:
            if not await self.registry.instances(capability=GATEWAY_CAPABILITY):
                logger.info("no gateway is live: discovery finds this instance once one runs")
                return
            # A poll with a deadline, not a cancelling timeout: the gateway writes Redis and
            # tells this instance nothing, and a cancel landing inside a redis-py call can be
            # lost there, which would leave the loop polling forever.
            while loop.time() < deadline:
                if await self.registry.indexed(self.id, self.instance, self._membership.tag):
                    return
                await asyncio.sleep(0.01)
        except REDIS_DOWN:
            return  # the heartbeat loop registers it again once Redis answers
        logger.warning(
            "no gateway indexed %s/%s within %gs (did the policy deny its registry event?): "
            "discovery by capability or topic does not find it yet",
            self.id,
            self.instance,
            INDEXED_WITHIN,
        )

    async def _ensure_topology(self) -> None:
        """Declare the mesh's exchanges, or, where this agent's broker user may not (a
        provisioned mesh), check that they exist.  Each try has a channel of its own: a
        refused declare closes its channel."""
        channel = await self.transport.open_channel()
        try:
            await topology.declare_exchanges(
                channel,
                dead_letter_max_bytes=self.settings.dead_letter_max_bytes,
                dead_letter_max_age=self.settings.dead_letter_max_age,
            )
            return
        except ChannelAccessRefused:
            logger.debug("may not declare the topology; checking it exists")
        finally:
            await settle(channel.close())
        channel = await self.transport.open_channel()
        try:
            await topology.check_exchanges(channel)
        finally:
            await settle(channel.close())

    async def _declare_requeue_exchange(self) -> None:
        """This agent's own requeue exchange, which its queues bind (any agent's user may;
        an operator's may not name ``mesh.dlx`` as its alternate, and its ``Client`` has no
        queue to bind)."""
        if not self.behaviour_map:
            return
        channel = await self.transport.open_channel()
        try:
            await topology.declare_requeue_exchange(channel, self.id)
        finally:
            await settle(channel.close())

    async def _start_behaviours(self) -> None:
        """Start the autostart behaviours, ``STARTS_AT_ONCE`` at a time.

        One after another, an agent with 1,000 behaviours took 12.5 s to start: each
        declare waits for the broker (a quorum queue starts a Raft group).  All of them
        are started before a failure is raised, so stopping the agent finds none half-way.
        """
        slots = asyncio.Semaphore(STARTS_AT_ONCE)

        async def start(behaviour: Behaviour) -> None:
            async with slots:
                await behaviour.start()

        results = await asyncio.gather(
            *(start(b) for b in self.behaviour_map.values() if b.autostart),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]

    async def on_stop(self) -> None:
        served = self._serving
        self._leaving, self._serving = True, False
        await asyncio.gather(*(b.stop() for b in self.behaviour_map.values()))
        await asyncio.gather(*self._membership_tasks, return_exceptions=True)
        if self._joined:  # not when the start failed before it joined
            self._joined = False
            within = min(LEAVE_WITHIN, self.settings.shutdown_timeout)
            try:
                async with asyncio.timeout(within):
                    await self._membership.leave()
            except TimeoutError:
                # The record is gone or lapses by itself; the event only hastens discovery.
                logger.warning("could not announce leaving within %gs", within)
        await self.on_drained()
        for awaited in self._awaited.values():
            awaited.replies.put_nowait(None)
        if self._inbox_channel is not None:
            try:
                await self._inbox_channel.close()
            except Exception as exc:  # the connection closes next anyway
                logger.debug("closing inbox channel: %r", exc)
        await self.transport.close()
        await self.redis.aclose()
        # After a start that failed, its error is the line to read; "stopped" would suggest
        # the agent had been running.
        logger.log(
            logging.INFO if served else logging.DEBUG,
            "agent %s/%s stopped",
            self.id,
            self.instance,
        )

    async def on_drained(self) -> None:
        """Called as the agent stops, once its behaviours finished and before its connections
        close: an extension point for what must be flushed with them still open."""

    async def _open_inbox(self) -> None:
        self._inbox_channel = await self.transport.open_channel(
            prefetch=self.settings.prefetch, confirms=False
        )
        self._inbox_channel.reopen_callbacks.add(self._reopen_inbox)
        await self._declare_inbox(self._inbox_channel)

    async def _declare_inbox(self, channel: AbstractRobustChannel) -> None:
        keys = [self.reply_to, topology.error_key(self.id, self.instance)]
        if self.controllable:
            keys.append(topology.control_key(self.id, "*"))
            if self.broadcast_control:
                keys.append(topology.control_key(topology.ALL_AGENTS, "*"))
        self._inbox_generation += 1
        name = topology.inbox_queue(self.id, self.instance, self._inbox_generation)
        inbox = await topology.declare_inbox(channel, name, keys)
        await inbox.consume(self._on_inbox, no_ack=True, robust=False)

    async def _reopen_inbox(self, channel: AbstractRobustChannel | None) -> None:
        # Called by aio-pika once the channel is back after a reconnect; its errors would
        # otherwise be swallowed there.
        try:
            if channel is not None:
                await self._declare_inbox(channel)
        except Exception:
            logger.exception(
                "agent %s/%s: no inbox after reconnecting; replies and control commands "
                "cannot reach this instance",
                self.id,
                self.instance,
            )

    def behaviour_changed(self, behaviour: Behaviour) -> None:
        logger.debug("behaviour %s is %s", behaviour.name, behaviour.status)
        if not self.registered or self._leaving or not self._membership.registered:
            return
        task = asyncio.get_running_loop().create_task(self._membership.changed(behaviour.name))
        self._membership_tasks.add(task)
        task.add_done_callback(self._membership_tasks.discard)

    async def _announce(self, event: str, payload: dict[str, Any]) -> None:
        key = topology.registry_key(event)
        await self.send(self._message(key, payload), key)

    def metadata(self) -> dict[str, Any]:
        """What the registry shows about this instance besides the standard fields."""
        return {}

    # --- registry and state -----------------------------------------------------------

    async def discover(
        self,
        *,
        capability: str | None = None,
        topic: str | None = None,
        alive: bool = True,
    ) -> list[AgentRecord]:
        """Agents with ``capability`` and/or a behaviour receiving ``topic``."""
        return await self.registry.agents(capability=capability, topic=topic, alive=alive)

    @property
    def state(self) -> Any:  # replaces mode's Service.state, used only in its repr
        """This agent's typed state (``state_model``), as last read or written."""
        if self._state is None:
            raise StateError(f"{type(self).__name__} declares no state_model")
        return self._state.value

    async def update_state(self, change: Change[Any] | None = None, /, **fields: Any) -> Any:
        """Validate and store a change of ``self.state``; safe against other replicas.

        ``change`` is a mapping of fields or a function of the current state; keyword
        arguments are fields.  Raises ``InvalidState`` (nothing written) on a wrong value
        and ``StateUnavailable`` while Redis is unreachable.
        """
        if self._state is None:
            raise StateError(f"{type(self).__name__} declares no state_model")
        return await self._state.update(as_change(change, fields))

    # --- behaviours at runtime -------------------------------------------------------

    def behaviour(self, name: str) -> Behaviour:
        try:
            return self.behaviour_map[name]
        except KeyError:
            raise KeyError(
                f"agent {self.id} has no behaviour {name!r} "
                f"(it has: {', '.join(self.behaviour_map) or 'none'})"
            ) from None

    async def start_behaviour(self, name: str) -> Behaviour:
        behaviour = self.behaviour(name)
        await behaviour.start()
        return behaviour

    async def stop_behaviour(self, name: str, exit_code: int = 0) -> Behaviour:
        behaviour = self.behaviour(name)
        await behaviour.stop(exit_code)
        return behaviour

    # --- sending ---------------------------------------------------------------------

    def _message(self, topic: str, payload: Any, **fields: Any) -> Message:
        """A message from this instance."""
        return Message(
            topic=topic, payload=payload, app_id=self.id, instance=self.instance, **fields
        )

    async def send(self, message: Message, routing_key: str) -> None:
        """Publish a fully built message to the policy exchange of its lane."""
        await self.transport.publish(
            topology.policy_exchange(routing_key),
            routing_key,
            to_amqp(message, user_id=self.transport.user),
        )

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        *,
        behaviour: str | None = None,
        headers: dict[str, Any] | None = None,
        expiration: float | None = None,
        schema: str | None = None,
    ) -> str:
        """Publish an event through the gateway; returns its message id once confirmed.

        ``schema`` names the schema version the payload was written against
        (``reading@2``, header ``x-mesh-schema``), for topics the policy gives schemas.
        """
        topology.check_topic(topic)
        message = self._message(
            topic,
            payload,
            behaviour=behaviour,
            headers=headers or {},
            expiration=expiration,
            schema_id=schema,
        )
        await self.send(message, topic)
        return message.message_id

    async def request(
        self,
        agent: str,
        operation: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        behaviour: str | None = None,
        model: type[M] | None = None,
        schema: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> Any:
        """Call ``operation`` on one instance of ``agent``; return the reply's payload.

        Raises ``RequestTimeout`` when no reply comes within ``timeout`` seconds and
        ``RemoteError`` when the handler failed or nobody serves the operation.  ``schema``
        names the payload's schema version, as for ``publish``; ``headers`` are sent with
        the request (the bridge's ``x-mesh-on-behalf-of``).
        """
        timeout = self.settings.request_timeout if timeout is None else timeout
        key = topology.request_key(
            topology.check_name("agent id", agent), topology.check_name("operation", operation)
        )
        if await self._is_alive(agent) is False:
            raise RemoteError(
                agent,
                operation,
                "NoLiveInstance",
                f"no instance of agent {agent!r} is alive in the registry (namespace "
                f"{self.settings.namespace!r}): it stopped, or has not started",
            )
        correlation = uuid.uuid4().hex
        message = self._message(
            key,
            payload,
            type=MessageType.REQUEST,
            behaviour=behaviour,
            correlation_id=correlation,
            reply_to=self.reply_to,
            expiration=timeout,
            schema_id=schema,
            headers=headers or {},
        )
        awaited = self._awaited[correlation] = _Awaited(agent)
        try:
            await self.send(message, key)
            reply = await asyncio.wait_for(awaited.replies.get(), timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {agent}.{operation} within {timeout:g}s "
                f"(request {message.message_id}; is a gateway running?)"
            ) from None
        finally:
            del self._awaited[correlation]
        if reply is None:
            raise AgentStopped(f"agent {self.id} stopped while waiting for {agent}.{operation}")
        if reply.type is MessageType.ERROR:
            raise RemoteError(agent, operation, *error_of(reply.payload))
        if model is not None:
            return model.model_validate(reply.payload)
        return reply.payload

    async def reply(self, request: Message, result: Any, *, error: bool = False) -> None:
        """Answer ``request`` on its reply route (a no-op for requests that want none)."""
        if not request.reply_to or not request.correlation_id:
            logger.warning("request %s has no reply route; result dropped", request.message_id)
            return
        if not request.reply_to.startswith("_reply."):
            logger.warning(
                "request %s names %r as reply route; result dropped",
                request.message_id,
                request.reply_to,
            )
            return
        message = self._message(
            request.reply_to,
            result,
            type=MessageType.ERROR if error else MessageType.REPLY,
            correlation_id=request.correlation_id,
        )
        await self.send(message, request.reply_to)

    async def control(
        self,
        agent: str,
        command: str,
        payload: Any = None,
        *,
        timeout: float = 1.0,
        expect: int | None = None,
        headers: dict[str, Any] | None = None,
    ) -> list[Message]:
        """Send a control command to every instance of ``agent`` (``_all``: every agent).

        Collects replies until ``timeout`` or until ``expect`` replies arrived.  ``headers``
        are sent with the command, as for ``request``.
        """
        if agent != topology.ALL_AGENTS:
            topology.check_name("agent id", agent)
        key = topology.control_key(agent, topology.check_name("command", command))
        if expect is None:
            expect = await self._live_instances(agent)
        correlation = uuid.uuid4().hex
        awaited = self._awaited[correlation] = _Awaited(agent)
        message = self._message(
            key,
            payload,
            type=MessageType.CONTROL,
            correlation_id=correlation,
            reply_to=self.reply_to,
            expiration=timeout,
            headers=headers or {},
        )
        collected: list[Message] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await self.send(message, key)
            while expect is None or len(collected) < expect:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    reply = await asyncio.wait_for(awaited.replies.get(), remaining)
                except TimeoutError:
                    break
                if reply is None:
                    break
                collected.append(reply)
        finally:
            del self._awaited[correlation]
        return collected

    async def _live_instances(self, agent: str) -> int | None:
        """How many instances should answer, per the registry; ``None`` if it can't tell."""
        try:
            found = await self.registry.instances(
                agent=None if agent == topology.ALL_AGENTS else agent
            )
        except (*REDIS_DOWN, ValueError):  # unreachable, or a record it cannot read
            return None
        if agent == topology.ALL_AGENTS:  # gateways do not take commands sent to all
            found = [i for i in found if GATEWAY_CAPABILITY not in i.capabilities]
        return len(found) or None

    async def _is_alive(self, agent: str) -> bool | None:
        """Whether the registry holds a live instance of ``agent``; ``None``: cannot tell."""
        now = asyncio.get_running_loop().time()
        if self._alive_until.get(agent, 0.0) > now:
            return True
        try:
            found = await self.registry.instances(agent=agent)
        except (*REDIS_DOWN, ValueError):  # unreachable, or a record it cannot read
            return None
        if found:
            self._alive_until[agent] = now + LIVENESS_CACHE
        return bool(found)

    async def _gateway_ids(self) -> list[str]:
        try:
            found = await self.registry.instances(capability=GATEWAY_CAPABILITY)
        except (*REDIS_DOWN, ValueError):
            return ["gateway"]
        return sorted({i.agent for i in found})

    async def ping(
        self, agent: str = topology.ALL_AGENTS, *, timeout: float = 1.0
    ) -> list[InstanceRecord]:
        """Ping every instance of ``agent`` (default: all agents); list who answered."""
        targets = [agent]
        if agent == topology.ALL_AGENTS:
            targets += await self._gateway_ids()
        rounds = await asyncio.gather(*(self.control(t, "ping", timeout=timeout) for t in targets))
        answers = [answer for round_ in rounds for answer in round_]
        replies = []
        for answer in answers:
            try:
                replies.append(InstanceRecord.model_validate(answer.payload))
            except ValidationError as exc:
                logger.warning("malformed ping reply from %s: %s", answer.app_id, exc)
        return sorted(replies, key=lambda r: (r.agent, r.instance))

    # --- the inbox -------------------------------------------------------------------

    async def _on_inbox(self, incoming: AbstractIncomingMessage) -> None:
        try:
            message = from_amqp(incoming)
        except EnvelopeError as exc:
            logger.warning("dropping malformed inbox message %s: %s", incoming.message_id, exc)
            return
        with logcontext.handling(message.message_id):
            if message.type is MessageType.CONTROL:
                await self._on_control(message)
            else:
                self._on_reply(message)

    def _on_reply(self, message: Message) -> None:
        correlation = message.correlation_id or ""
        awaited = self._awaited.get(correlation)
        if awaited is not None:
            if awaited.accepts(message):
                awaited.replies.put_nowait(message)
            else:
                logger.warning(
                    "%s %s from %s/%s ignored: not from %s, or a second answer (correlation %s)",
                    message.type,
                    message.message_id,
                    message.app_id,
                    message.instance,
                    awaited.agent,
                    correlation,
                )
            return
        if message.type is MessageType.ERROR and correlation == "":
            self.on_error_notice(message)
            return
        logger.info(
            "late or unknown %s %s from %s dropped (correlation %s)",
            message.type,
            message.message_id,
            message.app_id,
            correlation,
        )

    def on_error_notice(self, message: Message) -> None:
        """An error notice that answers no request: the gateway refused (``Denied``) or
        could not route an event this instance sent, whose id the body's ``message_id``
        names.  Logged; the bridge overrides it to tell whoever sent the event."""
        logger.warning("error notice from %s: %s: %s", message.app_id, *error_of(message.payload))

    async def _on_control(self, message: Message) -> None:
        if self._leaving:
            return  # a stopping instance is no longer part of the mesh; silence says so
        command = message.topic.rsplit(".", 1)[-1]
        args = message.payload if isinstance(message.payload, dict) else {}
        try:
            result = await self._control_command(command, args)
        except (KeyError, ValueError) as exc:
            await self.reply(
                message, {"error": str(exc).strip("'\""), "type": type(exc).__name__}, error=True
            )
            return
        await self.reply(message, result)
        if command == "shutdown":
            # Held, so the task is not garbage-collected before it ran.
            self._stopping_task = asyncio.get_running_loop().create_task(self._stop_process())

    async def _control_command(self, command: str, args: dict[str, Any]) -> Any:
        if command not in self.control_commands:
            raise ValueError(
                f"agent {self.id} does not take control command {command!r} over the mesh "
                f"(it takes: {', '.join(sorted(self.control_commands)) or 'none'})"
            )
        if command == "ping":
            return self.describe().model_dump(mode="json")
        if command in ("start_behaviour", "stop_behaviour"):
            name = str(args.get("behaviour", ""))
            if command == "start_behaviour":
                behaviour = await self.start_behaviour(name)
            else:
                behaviour = await self.stop_behaviour(name)
            return _behaviour_record(behaviour).model_dump(mode="json")
        if command == "shutdown":
            return {"agent": self.id, "instance": self.instance, "shutting_down": True}
        raise ValueError(f"unknown control command {command!r}")

    async def _stop_process(self) -> None:
        logger.info("shutdown requested over the mesh")
        root = self.beacon.root
        target = root.data if root is not None and root.data is not None else self
        await target.stop()

    def describe(self) -> InstanceRecord:
        """This instance as the registry and ping answers show it."""
        return InstanceRecord(
            agent=self.id,
            instance=self.instance,
            capabilities=list(self.capabilities),
            metadata=self.metadata(),
            behaviours=[_behaviour_record(b) for b in self.behaviour_map.values()],
            version=self.version,
            started_at=self.started_at,
        )


def _behaviour_record(behaviour: Behaviour) -> BehaviourRecord:
    return BehaviourRecord(
        name=behaviour.name,
        kind=behaviour.kind,
        state=behaviour.status.value,
        exit_code=behaviour.exit_code,
        binding_keys=behaviour.binding_keys,
    )
