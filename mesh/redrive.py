"""Redriving dead letters: one goes back into the queue it died in, on an operator's word.

The gateway does it (``mesh.gateway.redrive``), asked by ``mesh dead redrive`` with a request
to its ``redrive`` operation, which passes the gateway's pipeline like any request.  This
module holds what both sides share: the request and its answer, which queues a dead letter
may go back to and whose they are, the copy sent, and the marks that say which dead letters
were redriven (``mesh.dead`` is a stream: nothing in it can be changed).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import DeliveryMode
from pydantic import BaseModel, ConfigDict, Field

from mesh import topology
from mesh.deadlist import DeadLetter
from mesh.envelope import (
    H_ATTEMPT,
    H_DEAD_BY,
    H_DEAD_BY_USER,
    H_DELIVERY_COUNT,
    H_FILED_AT,
    H_MESH_ID,
    H_QUEUE,
    H_REASON,
    new_message_id,
)

REDRIVE = "redrive"
"""The gateway's operation: ``_req.<gateway>.redrive``."""

MAX_IDS = 500
"""Dead letters one request may name (``mesh dead redrive --all`` sends several)."""

CLAIM_MS = 60_000
"""How long one redrive of a dead letter keeps others of it off, at most."""

_DEATH_HEADERS = frozenset(
    {
        H_REASON, H_QUEUE, H_DEAD_BY, H_DEAD_BY_USER, H_FILED_AT, H_ATTEMPT, H_DELIVERY_COUNT,
        "x-death", "x-first-death-queue", "x-first-death-reason", "x-first-death-exchange",
        "x-last-death-queue", "x-last-death-reason", "x-last-death-exchange",
    }
)
"""What a dead letter carries about its death, which the redriven copy leaves behind."""


class RedriveRequest(BaseModel):
    """What ``mesh dead redrive`` asks the gateway."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=MAX_IDS)
    """Dead letters by offset in ``mesh.dead``."""
    again: bool = False
    """Also those redriven before."""
    dry_run: bool = False
    """Check each and say what would happen; send nothing, mark nothing, audit nothing."""
    force: bool = False
    """In open mode (no policy), redrive although nothing says whose the queue is."""


Outcome = Literal["redriven", "would redrive", "refused"]

Refusal = Literal["unknown", "redriven", "busy", "not allowed", "not sent"]
"""Why one was refused: no such dead letter; redriven before (without ``again``); another
redrive of it under way; it may not go back (not an event, not a behaviour's queue, not its
owner's, open mode); the copy was not sent (no audit trail, the queue gone)."""


class RedriveResult(BaseModel):
    """What became of one dead letter."""

    id: int
    outcome: Outcome
    reason: str
    queue: str | None = None
    topic: str | None = None
    audit: str | None = None
    """The audit record of the decision (``chain/entry``), when the gateway keeps a trail."""
    refusal: Refusal | None = None


class RedriveReport(BaseModel):
    results: list[RedriveResult]


class RedriveMark(BaseModel):
    """That a dead letter was redriven: when, by whom, into which queue."""

    time: float
    user: str | None
    agent: str | None
    queue: str
    audit: str | None = None
    on_behalf_of: str | None = None
    """The token user the bridge redrove it for (``user`` and ``agent`` are the bridge's)."""


def queue_agent(queue: str) -> str | None:
    """The agent a dead letter from ``queue`` goes back to, if it may go back at all: the
    queue of a behaviour (``mesh.q.<agent>.<behaviour>``) or of one instance's broadcast
    behaviour (``mesh.i.<agent>.<instance>.<behaviour>``); ``None`` for the mesh's queues,
    inboxes and retry delays."""
    words = queue.split(".")
    if len(words) == 4 and words[:2] == ["mesh", "q"]:
        agent, behaviour = words[2], words[3]
    elif len(words) == 5 and words[:2] == ["mesh", "i"]:
        agent, behaviour = words[2], words[4]
    else:
        return None
    try:
        topology.check_name("agent id", agent)
        topology.check_name("behaviour", behaviour)
    except topology.TopicError:
        return None
    return agent


def redrive_copy(dead: DeadLetter) -> aio_pika.Message:
    """The message to put back in its queue: the one that died, as its sender sent it and
    the gateway relayed it (topic, sender, ids, payload), without what its death added.
    Its attempts start again at 1; like every copy it has an AMQP id of its own."""
    incoming = dead.incoming
    headers = {k: v for k, v in dead.headers.items() if k not in _DEATH_HEADERS}
    headers[H_MESH_ID] = dead.message_id
    return aio_pika.Message(
        incoming.body,
        headers=headers,
        content_type=incoming.content_type,
        content_encoding=incoming.content_encoding,
        delivery_mode=DeliveryMode.PERSISTENT,
        correlation_id=incoming.correlation_id,
        message_id=new_message_id(),
        timestamp=incoming.timestamp,
        type=incoming.type,
        app_id=incoming.app_id,
    )


class RedriveMarks:
    """Which dead letters were redriven: the hash ``<namespace>:dead:redriven``, a
    ``RedriveMark`` per offset, and short claims that keep two redrives of one apart."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self.key = f"{namespace}:dead:redriven"

    async def of(self, ids: list[int]) -> dict[int, RedriveMark]:
        """The marks of those of ``ids`` that were redriven."""
        if not ids:
            return {}
        found = await self.redis.hmget(self.key, [str(i) for i in ids])
        return {
            i: RedriveMark.model_validate_json(raw)
            for i, raw in zip(ids, found, strict=True)
            if raw is not None
        }

    async def mark(self, id: int, mark: RedriveMark) -> None:
        await self.redis.hset(self.key, str(id), mark.model_dump_json())

    def _claim_key(self, id: int) -> str:
        return f"{self.namespace}:dead:redriving:{id}"

    async def claim(self, id: int) -> bool:
        """Whether this redrive of dead letter ``id`` may go ahead (no other is under way)."""
        return bool(await self.redis.set(self._claim_key(id), b"1", nx=True, px=CLAIM_MS))

    async def release(self, id: int) -> None:
        await self.redis.delete(self._claim_key(id))


def describe_mark(mark: RedriveMark) -> str:
    """``2024-06-01 12:00:03 by mesh.ops`` (local time), ``… by alice via mesh.bridge``."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mark.time))
    by = mark.user or mark.agent or "?"
    return f"{when} by {mark.on_behalf_of} via {by}" if mark.on_behalf_of else f"{when} by {by}"
