"""Support for the delivery, gateway and robustness tests.

``Host`` agents run in the test's event loop and report through asyncio queues; ``Peek``
looks at queues and dead letters on the test's vhost over a plain (not robust) channel;
``spawn_agent`` runs ``mesh run`` in a subprocess against the test's vhost and namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from pydantic import BaseModel

from behaviours import SubscriberBehaviour
from mesh import Agent, Behaviour, Message, Settings, on, rpc, topology
from mesh.deadletter import DeadLetterStream
from mesh.devservices import BrokerAdmin
from mesh.management import vhost_of

REPO = Path(__file__).resolve().parent.parent


class Host(Agent):
    """An agent whose behaviours put what they see on ``seen`` and wait on ``release``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: asyncio.Queue[Any] = asyncio.Queue()
        self.release = asyncio.Event()


def subscriber(
    settings: Settings, *behaviours: type[Behaviour], agent_id: str = "sub",
    instance: str | None = None,
) -> Host:
    """A ``Host`` running ``behaviours``."""
    cls = type("Subscriber", (Host,), {"behaviours": list(behaviours)})
    return cls(agent_id, settings=settings, instance=instance)


def host(behaviour: Behaviour) -> Host:
    agent = behaviour.agent
    assert isinstance(agent, Host), f"{behaviour.name} must run in a Host"
    return agent


class Hold(SubscriberBehaviour):
    """Holds each ``hold.item`` message until the test sets ``release``."""

    @on("hold.item")
    async def item(self, msg: Message, payload: object) -> None:
        agent = host(self)
        agent.seen.put_nowait(("started", msg.message_id))
        await agent.release.wait()
        agent.seen.put_nowait(("finished", msg.message_id))


class Listen(SubscriberBehaviour):
    """Puts every ``news.#`` message on its agent's ``seen``."""

    @on("news.#")
    async def news(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


class Service(Host):
    """Listens to news and echoes ``echo`` requests, recording both."""

    behaviours = [Listen]

    @rpc("echo")
    async def echo(self, msg: Message, payload: object) -> object:
        self.seen.put_nowait(msg)
        return payload


class Order(BaseModel):
    item: str
    qty: int


class Orders(SubscriberBehaviour):
    @on("orders.*", model=Order)
    async def order(self, msg: Message, order: Order) -> None:
        host(self).seen.put_nowait(order)


def drain(queue: asyncio.Queue[Any]) -> list[Any]:
    """Everything in ``queue`` right now."""
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def mesh_id(incoming: AbstractIncomingMessage) -> str:
    """The sender's message id of a delivered copy."""
    return str((incoming.headers or {}).get("x-mesh-id") or incoming.message_id)


def user_of(settings: Settings) -> str:
    return unquote(urlsplit(settings.amqp_url).username or "guest")


class Peek:
    """Looks at the test vhost's queues from its own plain connection."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.channel: AbstractChannel | None = None
        self._dead: DeadLetterStream | None = None

    async def _channel(self) -> AbstractChannel:
        if self.channel is None or self.channel.is_closed:
            self.channel = await self.connection.channel()
        return self.channel

    async def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (a plain channel asks the broker, not a cache)."""
        declared = await (await self._channel()).declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)

    async def tap(self, exchange: str, pattern: str) -> AbstractQueue:
        """A private queue that gets a copy of what ``exchange`` routes with ``pattern``."""
        queue = await (await self._channel()).declare_queue(exclusive=True)
        await queue.bind(exchange, pattern)
        return queue

    async def get(self, queue: AbstractQueue, timeout: float = 15.0) -> AbstractIncomingMessage:
        """The next message of ``queue`` (polling ``basic.get`` until the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                return message
            if time.monotonic() >= deadline:
                raise AssertionError(f"no message in {queue.name} within {timeout}s")
            await asyncio.sleep(0.02)

    async def dead_letter(
        self, message_id: str | None = None, timeout: float = 15.0
    ) -> AbstractIncomingMessage:
        """The next dead letter; it must be ``message_id``'s when one is given."""
        if self._dead is None:
            self._dead = DeadLetterStream(await self.connection.channel())
            await self._dead.__aenter__()
        try:
            dead = await self._dead.next(timeout)
        except TimeoutError:
            raise AssertionError(f"no dead letter within {timeout}s") from None
        assert message_id in (None, mesh_id(dead)), (
            f"unexpected dead letter {dead.routing_key} {dead.headers}"
        )
        return dead

    async def dead_letters_through_marker(self) -> list[AbstractIncomingMessage]:
        """Every dead letter not read yet, up to a marker this sends to ``mesh.dlx`` now.

        What a test expects *not* to be dead-lettered it checks against this list: the
        marker arriving proves everything dead-lettered before it has arrived too.
        """
        marker = f"marker-{uuid.uuid4().hex}"
        exchange = await (await self._channel()).get_exchange(topology.DEAD_LETTER_EXCHANGE)
        await exchange.publish(aio_pika.Message(b"{}", message_id=marker), "marker")
        seen = []
        while not seen or mesh_id(seen[-1]) != marker:
            seen.append(await self.dead_letter())
        return seen[:-1]

    async def is_empty(self, queue: str) -> bool:
        return await self.depth(queue) == 0

    async def publish_raw(self, routing_key: str, message: aio_pika.Message) -> None:
        """Publish ``message`` to the policy exchange of its lane as-is (no mesh client)."""
        exchange = await (await self._channel()).get_exchange(
            topology.policy_exchange(routing_key)
        )
        await exchange.publish(message, routing_key)


@asynccontextmanager
async def peek(settings: Settings) -> AsyncIterator[Peek]:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        yield Peek(connection)


async def queue_counts(admin: BrokerAdmin, settings: Settings, queue: str) -> tuple[int, int]:
    """``(ready, unacknowledged)`` for ``queue`` as the broker reports them."""
    out = await admin.ctl(
        "-q", "list_queues", "-p", vhost_of(settings),
        "name", "messages_ready", "messages_unacknowledged", "--formatter", "json",
    )
    for row in json.loads(out):
        if row["name"] == queue:
            return int(row["messages_ready"]), int(row["messages_unacknowledged"])
    raise AssertionError(f"queue {queue} does not exist")


async def consumers(admin: BrokerAdmin, settings: Settings, queue: str) -> int:
    """How many consumers the broker lists on ``queue``."""
    out = await admin.ctl(
        "-q", "list_consumers", "-p", vhost_of(settings), "queue_name", "--formatter", "json"
    )
    return sum(1 for row in json.loads(out) if row["queue_name"] == queue)


async def counts_are(
    admin: BrokerAdmin, settings: Settings, queue: str, *, ready: int, unacked: int
) -> bool:
    """Whether ``queue`` holds ``ready`` ready and ``unacked`` unacknowledged messages."""
    return await queue_counts(admin, settings, queue) == (ready, unacked)


class AgentProcess:
    """``python -m mesh.cli run SPEC --id ID`` in a subprocess on the test's vhost."""

    def __init__(self, settings: Settings, spec: str, agent_id: str, log: Path) -> None:
        self.settings = settings
        self.args = [sys.executable, "-m", "mesh.cli", "run", spec, "--id", agent_id]
        self.log_path = log
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    async def start(self) -> AgentProcess:
        env = dict(os.environ)
        env.update(
            MESH_AMQP_URL=self.settings.amqp_url,
            MESH_REDIS_URL=self.settings.redis_url,
            MESH_NAMESPACE=self.settings.namespace,
        )
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log, stderr=asyncio.subprocess.STDOUT,
        )
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        """Kill the process if it still runs (for ``finally`` blocks)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def agent_process(
    settings: Settings, spec: str, agent_id: str, log: Path
) -> AsyncIterator[AgentProcess]:
    """A running agent subprocess, killed on the way out if it is still alive."""
    process = AgentProcess(settings, spec, agent_id, log)
    try:
        yield await process.start()
    finally:
        await process.kill()
