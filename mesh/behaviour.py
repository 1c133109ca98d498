"""Behaviour: a unit of concurrent work inside an agent.

A behaviour has a ``main()`` coroutine (what the kinds in ``behaviours/`` specialise),
``@on`` handlers fed from its own queue through a bounded mailbox, and ``@rpc``
operations.  It can be started and stopped at runtime and reports an exit code.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol, TypeVar

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
from pydantic import BaseModel, ValidationError

from mesh import logcontext, topology
from mesh.bindings import Binding, BindingLedger, reconcile
from mesh.config import Settings
from mesh.deadletter import DeadLetters
from mesh.envelope import EnvelopeError, Message, MessageType, from_amqp
from mesh.idempotency import Claim, HandledIds
from mesh.membership import REDIS_DOWN
from mesh.metrics import Metrics, Outcome
from mesh.retry import Retries
from mesh.state import Change, StateError, StateSlot, StateStore, StateUnavailable, as_change
from mesh.topology import QueueMismatch, TopicError, TopologyError
from mesh.transport import PublishError, Refused, Transport, ack, is_stale, reject, settle
from mesh.upgrade import QueueUpgrade

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_ROUTES_ATTR = "__mesh_routes__"


class BehaviourStatus(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class RouteSpec:
    """What ``@on`` or ``@rpc`` recorded on a function."""

    pattern: str | None
    operation: str | None
    model: type[BaseModel] | None


@dataclass(frozen=True)
class Route:
    """A handler bound to an instance: an ``@on`` pattern or an ``@rpc`` operation."""

    spec: RouteSpec
    handler: Callable[[Message, Any], Awaitable[Any]]
    name: str


def on(pattern: str, *, model: type[BaseModel] | None = None) -> Callable[[F], F]:
    """Handle messages whose topic matches ``pattern`` (``*`` one word, ``#`` any words)."""
    topology.check_pattern(pattern)
    return _mark(RouteSpec(pattern=pattern, operation=None, model=model))


REGISTRY_EVENTS = frozenset({"join", "leave", "behaviour"})


def on_registry(event: str = "*", *, model: type[BaseModel] | None = None) -> Callable[[F], F]:
    """Handle the registry's events: ``join``, ``leave``, ``behaviour`` (``*``: all three).

    They travel the mesh's own lane (``mesh.internal``), which ``@on`` patterns never see.
    """
    if event != "*" and event not in REGISTRY_EVENTS:
        raise TopicError(
            f"unknown registry event {event!r} (expected {', '.join(sorted(REGISTRY_EVENTS))} "
            "or '*')"
        )
    return _mark(RouteSpec(pattern=topology.registry_key(event), operation=None, model=model))


def rpc(operation: str, *, model: type[BaseModel] | None = None) -> Callable[[F], F]:
    """Serve requests for ``operation``; the handler's return value is the reply."""
    topology.check_name("operation", operation)
    return _mark(RouteSpec(pattern=None, operation=operation, model=model))


def _mark(spec: RouteSpec) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        specs: list[RouteSpec] = func.__dict__.setdefault(_ROUTES_ATTR, [])
        specs.append(spec)
        return func

    return decorate


def collect_routes(owner: object) -> list[Route]:
    """The routes declared on ``owner``'s class, bound to ``owner``, in definition order."""
    return [
        Route(spec=spec, handler=getattr(owner, attr), name=attr)
        for attr, spec in _route_specs(type(owner))
    ]


def _route_specs(owner: type) -> list[tuple[str, RouteSpec]]:
    specs: list[tuple[str, RouteSpec]] = []
    seen: set[str] = set()
    for cls in owner.__mro__:
        for attr, value in vars(cls).items():
            if attr in seen:
                continue
            seen.add(attr)
            specs.extend((attr, spec) for spec in getattr(value, _ROUTES_ATTR, ()))
    return specs


def _warn_overlaps(cls: type) -> None:
    """Only the first ``@on`` handler whose pattern matches runs: say so where two overlap."""
    handlers = [(attr, spec.pattern) for attr, spec in _route_specs(cls) if spec.pattern]
    for n, (first, first_pattern) in enumerate(handlers):
        for second, second_pattern in handlers[n + 1 :]:
            same_lane = topology.is_internal(first_pattern) == topology.is_internal(second_pattern)
            if first != second and same_lane and topology.overlap(first_pattern, second_pattern):
                warnings.warn(
                    f"{cls.__name__}: patterns {first_pattern!r} ({first}) and "
                    f"{second_pattern!r} ({second}) overlap; a message matching both goes "
                    f"to {first} only",
                    stacklevel=3,
                )


class Host(Protocol):
    """What a behaviour needs from the agent that runs it."""

    @property
    def id(self) -> str: ...
    @property
    def instance(self) -> str: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def transport(self) -> Transport: ...
    @property
    def dead_letters(self) -> DeadLetters: ...
    @property
    def bindings_ledger(self) -> BindingLedger: ...
    @property
    def retries(self) -> Retries: ...
    @property
    def state_store(self) -> StateStore: ...
    @property
    def handled_ids(self) -> HandledIds: ...
    @property
    def metrics(self) -> Metrics: ...

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        *,
        behaviour: str | None = None,
        headers: dict[str, Any] | None = None,
        expiration: float | None = None,
        schema: str | None = None,
    ) -> str: ...

    async def request(
        self,
        agent: str,
        operation: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        behaviour: str | None = None,
        schema: str | None = None,
    ) -> Any: ...

    async def reply(self, request: Message, result: Any, *, error: bool = False) -> None: ...

    def behaviour_changed(self, behaviour: Behaviour) -> None: ...


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().replace("__", "_")


class Behaviour:
    """Base class of every behaviour kind.

    Subclasses override :meth:`main` (the kinds in ``behaviours/`` do) and declare
    ``@on`` handlers and ``@rpc`` operations.  ``main`` returning ends the behaviour
    (status ``done``, exit code its return value or 0); raising ends it ``failed``
    with exit code 1; :meth:`stop` ends it ``stopped``.
    """

    kind: ClassVar[str] = "behaviour"
    name: ClassVar[str] = ""
    """Unique within the agent; defaults to the class name in snake case."""
    max_concurrency: ClassVar[int] = 1
    """Handlers running at once; 1 handles messages in order."""
    mailbox_size: ClassVar[int] = 100
    """Messages taken from the broker ahead of the handlers (the AMQP prefetch)."""
    max_deliveries: ClassVar[int | None] = None
    """Attempts before a failing message is dead-lettered; ``None``: the settings' value."""
    retry_delays: ClassVar[tuple[float, ...] | None] = None
    """Seconds before attempt 2, 3, … (the last repeats); ``None``: the settings' value."""
    broadcast: ClassVar[bool] = False
    """Every instance gets every message (a queue of its own) instead of sharing one."""
    queue_type: ClassVar[str] = "quorum"
    """``classic`` for disposable work: cheaper to declare, not replicated."""
    max_queue_length: ClassVar[int | None] = None
    """Messages the queue holds before the oldest are dead-lettered; ``None``: the settings'."""
    idempotent: ClassVar[bool] = False
    """Skip an event whose id this behaviour handled already (ids kept in Redis for
    ``idempotency_window`` seconds): effectively-once handling of at-least-once delivery."""
    autostart: ClassVar[bool] = True
    state_model: ClassVar[type[BaseModel] | None] = None
    """The pydantic model of ``self.state``, kept in Redis per agent and behaviour."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = _snake_case(cls.__name__)
        topology.check_name("behaviour name", cls.name)
        if cls.max_concurrency < 1 or cls.mailbox_size < 1:
            raise ValueError(f"{cls.__name__}: max_concurrency and mailbox_size must be >= 1")
        if cls.queue_type not in topology.QUEUE_TYPES:
            raise ValueError(
                f"{cls.__name__}: queue_type {cls.queue_type!r} is not one of "
                f"{', '.join(topology.QUEUE_TYPES)}"
            )
        if cls.max_queue_length is not None and cls.max_queue_length < 1:
            raise ValueError(f"{cls.__name__}: max_queue_length must be >= 1")
        if cls.retry_delays is not None and (
            not cls.retry_delays or min(cls.retry_delays) < 0.001
        ):
            raise ValueError(f"{cls.__name__}: retry_delays must be one or more delays >= 0.001 s")
        _warn_overlaps(cls)

    def __init__(self, agent: Host) -> None:
        self.agent = agent
        self.status = BehaviourStatus.CREATED
        self.exit_code: int | None = None
        self.routes = collect_routes(self)
        self._subscriptions = [r for r in self.routes if r.spec.pattern is not None]
        # Per lane, sorted once: "#" matches "_registry.join" as a pattern, not as a binding.
        self._lanes: dict[bool, list[tuple[str, Route]]] = {False: [], True: []}
        for route in self._subscriptions:
            pattern = route.spec.pattern or ""
            self._lanes[topology.is_internal(pattern)].append((pattern, route))
        self._operations = {r.spec.operation: r for r in self.routes if r.spec.operation}
        self._task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._ending = False
        self._lifecycle = asyncio.Lock()
        self._stop_code = 0
        self._consumer: _Consumer | None = None
        self._metrics = agent.metrics.behaviour(self.name)
        store = agent.state_store
        self._state = (
            StateSlot(store, store.key(agent.id, self.name), self.state_model)
            if self.state_model is not None
            else None
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.status}>"

    @property
    def binding_keys(self) -> list[str]:
        keys = [r.spec.pattern for r in self._subscriptions if r.spec.pattern]
        keys += [topology.request_key(self.agent.id, op) for op in self._operations]
        return list(dict.fromkeys(keys))

    @property
    def bindings(self) -> list[Binding]:
        """Every binding ``declare_queue`` makes; a start removes those a former one made."""
        found = [Binding(topology.delivery_exchange(key), key) for key in self.binding_keys]
        requeue = Binding(
            topology.requeue_exchange(self.agent.id), topology.requeue_key(self.queue_name)
        )
        return [*found, requeue]

    @property
    def queue_name(self) -> str:
        if self.broadcast:
            return topology.broadcast_queue(self.agent.id, self.agent.instance, self.name)
        return topology.behaviour_queue(self.agent.id, self.name)

    @property
    def is_running(self) -> bool:
        return self.status is BehaviourStatus.RUNNING

    # --- what subclasses override -------------------------------------------------

    async def setup(self) -> None:
        """Called before the behaviour starts; may publish or request."""

    async def main(self) -> int | None:
        """The behaviour's life; the default lives until stopped, serving its handlers."""
        await asyncio.Event().wait()
        return None

    async def teardown(self) -> None:
        """Called after the behaviour ended, whatever the reason."""

    @property
    def consumes(self) -> bool:
        """Whether the behaviour takes messages from a queue (it does if it has handlers)."""
        return bool(self.routes)

    async def handle_delivery(self, incoming: AbstractIncomingMessage) -> None:
        """Handle one delivery and settle it: ack, requeue, or dead-letter with a reason.

        The default decodes the envelope and dispatches to the ``@on`` / ``@rpc``
        handlers; a behaviour that relays raw messages (the gateway) overrides it.
        """
        await _Dispatch(self, incoming).run()

    @property
    def queue_arguments(self) -> dict[str, Any]:
        """The arguments of the queue the handlers consume."""
        max_length = self.max_queue_length or self.agent.settings.max_queue_length
        return topology.behaviour_queue_args(self.queue_type, max_length)

    async def declare_queue(self, channel: AbstractRobustChannel) -> AbstractQueue:
        """Declare the queue the handlers consume (starting binds it to ``bindings``)."""
        if self.broadcast:
            return await topology.declare_broadcast_queue(
                channel,
                self.queue_name,
                self.queue_arguments,
                self.agent.settings.broadcast_queue_expires,
            )
        return await topology.declare_shared_queue(
            channel, self.queue_name, self.queue_arguments
        )

    # --- what behaviours call -----------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        *,
        headers: dict[str, Any] | None = None,
        expiration: float | None = None,
        schema: str | None = None,
    ) -> str:
        """Publish through the gateway; returns the message id once the broker confirmed it.
        ``schema`` names the payload's schema version (``reading@2``)."""
        return await self.agent.publish(
            topic,
            payload,
            behaviour=self.name,
            headers=headers,
            expiration=expiration,
            schema=schema,
        )

    async def request(
        self,
        agent: str,
        operation: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        schema: str | None = None,
    ) -> Any:
        """Call ``operation`` on ``agent`` and return the reply's payload."""
        return await self.agent.request(
            agent, operation, payload, timeout=timeout, behaviour=self.name, schema=schema
        )

    @property
    def state(self) -> Any:
        """This behaviour's typed state (``state_model``), as last read or written."""
        if self._state is None:
            raise StateError(f"{type(self).__name__} declares no state_model")
        return self._state.value

    async def update_state(self, change: Change[Any] | None = None, /, **fields: Any) -> Any:
        """Validate and store a change of ``self.state`` (see ``Agent.update_state``)."""
        if self._state is None:
            raise StateError(f"{type(self).__name__} declares no state_model")
        return await self._state.update(as_change(change, fields))

    def kill(self, exit_code: int = 0) -> None:
        """End the behaviour from inside (a handler or ``main``) with ``exit_code``."""
        if self._ending:
            return  # teardown has begun and runs to its end
        self._stop_code = exit_code
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # --- lifecycle, driven by the agent ---------------------------------------------

    async def start(self) -> None:
        """Start the behaviour (again, if it ended before)."""
        async with self._lifecycle:
            # A teardown begun by the behaviour itself may still be closing its channel.
            await self._finished_teardown()
            if self._task is not None and not self._finished.is_set():
                return  # running
            await self._start()

    async def _finished_teardown(self) -> None:
        if self._ending:
            await self._finished.wait()

    async def _start(self) -> None:
        self.exit_code = None
        self._stop_code = 0
        self._ending = False
        self._finished.clear()
        context = contextvars.copy_context()
        context.run(logcontext.agent_id.set, self.agent.id)
        if self._state is not None:
            await self._state.try_restore()
        await self.setup()
        if self.consumes:
            self._consumer = _Consumer(self, context)
            await self._consumer.start()
        self._set_status(BehaviourStatus.RUNNING)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"{self.agent.id}.{self.name}", context=context
        )

    async def stop(self, exit_code: int = 0) -> int | None:
        """Stop: finish in-flight messages, requeue the rest, end ``main``; return the exit code."""
        task = self._task
        if task is None or task.done():
            await self._finished_teardown()
            return self.exit_code
        if asyncio.current_task() is task or (
            self._consumer is not None and self._consumer.owns_current_task()
        ):
            self.kill(exit_code)
            return None  # stopping from inside: the rest happens when this task returns
        async with self._lifecycle:
            if not self._ending:
                self._stop_code = exit_code
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if not self._ending:
                # Cancelled before its first step, so _run never got to clean up.
                self.exit_code = exit_code
                await self._finish(BehaviourStatus.STOPPED)
            await self._finished.wait()
        return self.exit_code

    async def wait(self) -> int | None:
        """Wait until the behaviour ended; return its exit code."""
        await self._finished.wait()
        return self.exit_code

    async def _run(self) -> None:
        status = BehaviourStatus.DONE
        try:
            code = await self.main()
            self.exit_code = 0 if code is None else code
        except asyncio.CancelledError:
            status = BehaviourStatus.STOPPED
            self.exit_code = self._stop_code
        except Exception:
            logger.exception("behaviour %s failed", self.name)
            status = BehaviourStatus.FAILED
            self.exit_code = 1
        await self._finish(status)

    async def _finish(self, status: BehaviourStatus) -> None:
        # Once begun, teardown runs to its end: kill() and stop() no longer cancel, and a
        # cancellation from outside (the loop shutting down) waits for it too.
        self._ending = True
        await asyncio.shield(self._teardown(status))

    async def _teardown(self, status: BehaviourStatus) -> None:
        try:
            if self._consumer is not None:
                await self._consumer.stop()
                self._consumer = None
            await self.teardown()
        except Exception:
            logger.exception("behaviour %s: teardown failed", self.name)
        finally:
            self._set_status(status)
            self._finished.set()

    def _set_status(self, status: BehaviourStatus) -> None:
        self.status = status
        self.agent.behaviour_changed(self)

    # --- message handling -----------------------------------------------------------

    def route_for(self, message: Message) -> Route | None:
        if message.type is MessageType.REQUEST:
            operation = message.topic.rsplit(".", 1)[-1]
            return self._operations.get(operation)
        for pattern, route in self._lanes[topology.is_internal(message.topic)]:
            if topology.matches(pattern, message.topic):
                return route
        return None

    @property
    def delivery_limit(self) -> int:
        return self.max_deliveries or self.agent.settings.max_deliveries

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after ``attempt``."""
        delays = self.retry_delays or self.agent.settings.retry_delays
        return delays[min(attempt, len(delays)) - 1]


class _Consumer:
    """A behaviour's queue, mailbox and handler workers."""

    def __init__(self, behaviour: Behaviour, context: contextvars.Context) -> None:
        self.behaviour = behaviour
        self.context = context
        self.mailbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.workers: list[asyncio.Task[None]] = []
        self.busy = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.channel: AbstractRobustChannel | None = None
        self.queue: AbstractQueue | None = None
        self.consumer_tag: str | None = None
        self.stopping = False

    def owns_current_task(self) -> bool:
        return asyncio.current_task() in self.workers

    async def start(self) -> None:
        b = self.behaviour
        transport = b.agent.transport
        settings = b.agent.settings
        upgrade = QueueUpgrade(transport, b.agent.bindings_ledger, migrate=settings.migrate_queues)
        self.channel = await transport.open_channel(prefetch=b.mailbox_size, confirms=False)
        try:
            self.queue = await b.declare_queue(self.channel)
        except QueueMismatch as mismatch:
            await upgrade.clear(mismatch, b.bindings)
            await settle(self.channel.close())  # the broker closed it with the failed declare
            self.channel = await transport.open_channel(prefetch=b.mailbox_size, confirms=False)
            self.queue = await b.declare_queue(self.channel)
        # A binding the code no longer declares (a renamed pattern) must stop delivering.
        expires = settings.broadcast_queue_expires if b.broadcast else None
        await reconcile(self.queue, b.bindings, b.agent.bindings_ledger, expires=expires)
        if settings.migrate_queues:
            await upgrade.finish(self.queue)
        loop = asyncio.get_running_loop()
        self.workers = [
            loop.create_task(
                self._work(), name=f"{b.agent.id}.{b.name}.worker{i}", context=self.context.copy()
            )
            for i in range(b.max_concurrency)
        ]
        self.consumer_tag = await self.queue.consume(self._deliver)

    async def _deliver(self, incoming: AbstractIncomingMessage) -> None:
        self.mailbox.put_nowait(incoming)

    async def stop(self) -> None:
        """Stop taking messages, requeue those not started, let in-flight ones finish; all
        within ``shutdown_timeout``."""
        b = self.behaviour
        loop = asyncio.get_running_loop()
        deadline = loop.time() + b.agent.settings.shutdown_timeout
        if self.queue is not None and self.consumer_tag is not None:
            try:
                # With the connection lost, aio-pika waits for it to come back before it
                # sends the cancel; the broker dropped the consumer with the connection.
                async with asyncio.timeout_at(deadline):
                    await self.queue.cancel(self.consumer_tag)
            except Exception as exc:  # the broker will requeue on channel close anyway
                logger.debug("cancel consumer of %s: %r", b.queue_name, exc)
        # Only now: a message handed back while the consumer was active would come
        # straight back to it, each round counting as a delivery.
        self.stopping = True
        await self._hand_back()
        try:
            async with asyncio.timeout_at(deadline):
                await self.idle.wait()
        except TimeoutError:
            logger.warning(
                "%s: handlers still running after %gs; requeueing their messages",
                b.name,
                b.agent.settings.shutdown_timeout,
            )
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)
        self.workers = []
        await self._hand_back()  # deliveries that were still on their way at cancel
        if self.channel is not None:
            await settle(self.channel.close())

    async def _hand_back(self) -> None:
        """Return every message not started to the queue (a plain nack, not a failure)."""
        # Taken out in one go, before any await, so no worker starts one of them.
        unstarted = [self.mailbox.get_nowait() for _ in range(self.mailbox.qsize())]
        for incoming in unstarted:
            await reject(incoming, requeue=True)

    async def _work(self) -> None:
        while True:
            incoming = await self.mailbox.get()
            if self.stopping or is_stale(incoming):
                # Stopping: hand it back.  Closed channel: the broker already requeued it,
                # and handling it now would handle it twice.
                await reject(incoming, requeue=True)
                continue
            self.busy += 1
            self.idle.clear()
            try:
                await self.behaviour.handle_delivery(incoming)
            except asyncio.CancelledError:
                await reject(incoming, requeue=True)
                raise
            except Exception:
                # Dead-lettering or replying failed (broker trouble): let it come back.
                logger.exception(
                    "%s: could not settle a message; requeueing it", self.behaviour.name
                )
                await reject(incoming, requeue=True)
            finally:
                self.busy -= 1
                if self.busy == 0:
                    self.idle.set()


class _Dispatch:
    """One delivery on its way to a handler, and how it is settled."""

    def __init__(self, behaviour: Behaviour, incoming: AbstractIncomingMessage) -> None:
        self.behaviour = behaviour
        self.incoming = incoming
        self.outcome = "handled"
        """What became of the message, for the debug log."""
        self.result: Outcome = "handled"
        """What became of it, for the metrics."""

    async def run(self) -> None:
        b = self.behaviour
        incoming = self.incoming
        try:
            message = from_amqp(incoming)
        except EnvelopeError as exc:
            await b.agent.dead_letters.send(incoming, f"malformed message: {exc}", b.queue_name)
            await ack(incoming)
            b._metrics.settled("dead_lettered")
            return
        started = time.perf_counter()
        with logcontext.handling(message.message_id):
            try:
                await self._dispatch(message)
            finally:
                seconds = time.perf_counter() - started
                logger.debug(
                    "%s %s %s: %s in %.1f ms",
                    b.name,
                    message.topic,
                    message.message_id,
                    self.outcome,
                    seconds * 1000,
                )
        b._metrics.settled(self.result, seconds)  # not when it raised: it is requeued

    async def _dispatch(self, message: Message) -> None:
        b = self.behaviour
        incoming = self.incoming
        route = b.route_for(message)
        if route is None:
            reason = f"no handler in behaviour {b.name!r} for topic {message.topic!r}"
            await self._reject(message, reason)
            return
        payload: Any = message.payload
        if route.spec.model is not None:
            try:
                payload = route.spec.model.model_validate(message.payload)
            except ValidationError as exc:
                reason = f"payload does not match {route.spec.model.__name__}: {_errors(exc)}"
                await self._reject(message, reason)
                return
        if b.idempotent and message.type is MessageType.EVENT:
            await self._once(message, route, payload)
            return
        try:
            result = await route.handler(message, payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(message, route, exc)
            return
        if message.type is MessageType.REQUEST:
            try:
                await b.agent.reply(message, result)
            except EnvelopeError as exc:
                await self._failed(message, route, exc)
                return
            except PublishError as exc:
                # The handler ran; running it again for a lost reply would repeat its effects.
                logger.error(
                    "%s.%s: reply to %s lost: %s", b.name, route.name, message.reply_to, exc
                )
        await ack(incoming)

    async def _once(self, message: Message, route: Route, payload: Any) -> None:
        """Handle an event unless a delivery of it was handled already (``idempotent``)."""
        b = self.behaviour
        handled = b.agent.handled_ids
        key = handled.key(b.agent.id, b.name, message.message_id)
        try:
            claim = await handled.claim(key)
        except REDIS_DOWN as exc:
            unknown = StateUnavailable(f"whether it was handled before is unknown: Redis: {exc}")
            await self._failed(message, route, unknown)
            return
        if claim is Claim.DONE:
            self.outcome, self.result = "skipped (handled before)", "skipped"
            logger.info("%s: %s was handled before; skipped", b.name, message.message_id)
            await ack(self.incoming)
            return
        if claim is Claim.BUSY:
            self.outcome = "deferred (another delivery of it is being handled)"
            self.result = "deferred"
            # Another delivery of it is in a handler right now: look again later, and do
            # not count this as an attempt (it never ran).
            await b.agent.retries.send(
                self.incoming, b.queue_name, attempt=message.attempt, delay=b.retry_delay(1)
            )
            await ack(self.incoming)
            return
        try:
            await route.handler(message, payload)
        except asyncio.CancelledError:
            await _settle_claim(handled.release(key))
            raise
        except Exception as exc:
            await _settle_claim(handled.release(key))
            await self._failed(message, route, exc)
            return
        # Done before acked: a crash in between skips the redelivery, as it should.
        await _settle_claim(handled.done(key))
        await ack(self.incoming)

    async def _reject(self, message: Message, reason: str) -> None:
        """Dead-letter a message no retry can fix; tell a waiting requester why."""
        b = self.behaviour
        incoming = self.incoming
        logger.warning("%s: dead-lettering %s: %s", b.name, message.message_id, reason)
        self.outcome, self.result = "dead-lettered (refused)", "dead_lettered"
        if message.type is MessageType.REQUEST:
            await self._answer_error(message, {"error": reason, "type": "InvalidRequest"})
        await b.agent.dead_letters.send(incoming, reason, b.queue_name)
        await ack(incoming)

    async def _answer_error(self, request: Message, body: dict[str, str]) -> None:
        """Tell the caller why its request failed; a lost answer is logged, not retried
        (requests are never retried: that would run the handler behind the caller's back)."""
        try:
            await self.behaviour.agent.reply(request, body, error=True)
        except PublishError as exc:
            logger.error("error reply to %s lost: %s", request.reply_to, exc)

    async def _failed(self, message: Message, route: Route, exc: Exception) -> None:
        b = self.behaviour
        incoming = self.incoming
        summary = f"{type(exc).__name__}: {exc}"
        if message.type is MessageType.REQUEST:
            # The caller is waiting: answer now rather than retrying behind its back.
            logger.warning("%s.%s failed: %s", b.name, route.name, summary)
            self.outcome = f"failed, error answered ({type(exc).__name__})"
            self.result = "failed"
            # The type travels on its own: RemoteError shows "Type: detail" once.
            detail = str(exc) or type(exc).__name__
            await self._answer_error(message, {"error": detail, "type": type(exc).__name__})
            await ack(incoming)
            return
        attempt = message.attempt
        if attempt < b.delivery_limit:
            delay = b.retry_delay(attempt)
            logger.warning(
                "%s.%s failed (attempt %d of %d), retrying in %gs: %s",
                b.name,
                route.name,
                attempt,
                b.delivery_limit,
                delay,
                summary,
            )
            try:
                await b.agent.retries.send(
                    incoming, b.queue_name, attempt=attempt + 1, delay=delay
                )
            except (Refused, TopologyError) as retry_error:
                # No retry copy can be made (a delay queue declared otherwise, no right to
                # publish it): a redelivery now would fail the same way, so give up here.
                reason = (
                    f"handler {b.name}.{route.name} failed (attempt {attempt}): {summary}; "
                    f"could not schedule a retry: {retry_error}"
                )
                await self._dead_letter(message, reason)
                return
            self.outcome = f"failed ({type(exc).__name__}), retry {attempt + 1} in {delay:g}s"
            self.result = "failed"
            await ack(incoming)
            return
        frames = traceback.extract_tb(exc.__traceback__)[-3:]
        where = "; ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}" for f in frames)
        await self._dead_letter(
            message,
            f"handler {b.name}.{route.name} failed {attempt} times; last: {summary} (at {where})",
        )

    async def _dead_letter(self, message: Message, reason: str) -> None:
        b = self.behaviour
        incoming = self.incoming
        logger.error("%s: dead-lettering %s: %s", b.name, message.message_id, reason)
        self.outcome, self.result = "dead-lettered (failed)", "dead_lettered"
        await b.agent.dead_letters.send(incoming, reason, b.queue_name)
        await ack(incoming)


async def _settle_claim(operation: Awaitable[None]) -> None:
    """A claim that cannot be recorded lapses after its lease; that is all it costs."""
    try:
        await operation
    except REDIS_DOWN as exc:
        logger.warning("handled-ids not updated (Redis: %s); the claim lapses", exc)


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
    )
