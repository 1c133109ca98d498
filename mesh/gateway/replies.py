"""Reply binding stage: a reply passes only if a request is waiting for it, from whom was asked.

A request or control command that passes the gateway leaves a *binding* in Redis, keyed by
the requester's reply route and the correlation id, holding the agent it was addressed to,
for the request's lifetime.  A reply (or error) to that route and correlation id takes the
binding; one that finds none, or finds another agent's, is denied, so a forged, second or
late reply never reaches the caller's inbox.  Bindings live in Redis, not in the replica,
because a request and its reply may pass different gateway replicas.

Keys (``<ns>`` is the mesh namespace, ``<route>`` the requester's ``_reply.<agent>.<instance>``)::

    <ns>:replies:<route>:<correlation id>            the addressed agent (a request), or
                                                     ``ctl:<agent>`` (a control command;
                                                     ``ctl:_all``: any agent)
    <ns>:replies:answered:<route>:<correlation id>   a control command's answers so far, a
                                                     set of ``<agent>/<instance>``

Both expire with the request (its AMQP expiration, at most ``topology.INTERNAL_TTL_MS``).
The route is made of two checked names, so it holds no ``:`` and a correlation id, whatever
it holds, cannot make one key pass for another.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from mesh import topology
from mesh.envelope import H_INSTANCE
from mesh.gateway.pipeline import Denied, Passage, Unavailable
from mesh.membership import REDIS_DOWN
from mesh.topology import TopicError

CONTROL = "ctl:"
"""Prefix of a control command's binding: it takes one answer per instance, not one."""

NO_BINDING = (
    "no request is waiting for this reply (never asked, answered already, or past its deadline)"
)

# One round trip, atomic.  KEYS: the binding, the control command's answered set.
# ARGV: the sender's agent, its instance, the TTL to fall back on.
# Returns {0} no binding, {1} taken, {2, agent} addressed to another agent,
# {3} this instance answered the control command already.
# A request's binding is deleted only by a reply from its agent: a reply from another
# agent must not use up the binding that the real one needs.
_TAKE = """
local bound = redis.call('GET', KEYS[1])
if not bound then return {0} end
if string.sub(bound, 1, 4) ~= 'ctl:' then
  if bound ~= ARGV[1] then return {2, bound} end
  redis.call('DEL', KEYS[1])
  return {1}
end
local agent = string.sub(bound, 5)
if agent ~= '_all' and agent ~= ARGV[1] then return {2, agent} end
if redis.call('SADD', KEYS[2], ARGV[1] .. '/' .. ARGV[2]) == 0 then return {3} end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 1 then ttl = tonumber(ARGV[3]) end
redis.call('PEXPIRE', KEYS[2], ttl)
return {1}
"""


class _Pipe:
    """Sends the Redis commands issued while a batch is out as the next batch, on one
    connection, and answers each command's caller in the order the commands were issued.

    *Why:* the relay keeps each sender's order per replica because its handlers reach the
    publishing channel in delivery order without awaiting I/O; a stage that awaits Redis
    must not let a later message overtake an earlier one.  Answering in issue order wakes
    the handlers in issue order, and each runs on to the channel before the next resumes.
    One connection in a row also keeps 512 concurrent relays from opening 512 connections,
    and is still one round trip per message (fewer under load).
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._pending: list[tuple[Sequence[Any], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def call(self, *command: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((command, future))
        if self._sender is None:
            self._sender = loop.create_task(self._send(), name="reply-bindings")
        return await future

    async def _send(self) -> None:
        batch: list[tuple[Sequence[Any], asyncio.Future[Any]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                pipe = self._redis.pipeline(transaction=False)
                for command, _ in batch:
                    pipe.execute_command(*command)
                try:
                    results = await pipe.execute(raise_on_error=False)
                except Exception as exc:
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # its caller was cancelled
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        finally:
            self._sender = None
            # Cancelled (the loop is closing): nobody waits forever for an answer.
            for _, future in (*batch, *self._pending):
                future.cancel()
            self._pending = []


class BindReplies:
    """Binds each request and control command to the agent it addresses; lets a reply or
    error through only once per binding (a control command: once per answering instance),
    only from that agent, and only before the request's deadline.

    The sender is its ``app_id``: the identity the gateway has for an agent today.  It is
    claimed by the sender, not verified (``Passage.user`` is the verified broker user, but
    nothing ties it to an agent id yet).  **When per-agent users land**, the authorize stage
    binds ``app_id`` to the user and this comparison becomes a verified one, unchanged.

    Redis unreachable: both sides fail closed (``Unavailable``: the gateway waits for Redis,
    holding the message, and passes nothing unbound).
    A request is refused at once, so its caller hears at once (a ``RemoteError``) and the
    handler never runs; relaying it without a binding would not help, as its reply would
    then find none and be denied after the handler ran (its effects done, its caller timing
    out).  A reply is refused because it cannot be told from a forged one; its caller times
    out, and the reply is in ``mesh.dead`` with the reason.
    """

    name = "replies"

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self._pipe = _Pipe(redis)
        self._prefix = f"{namespace}:replies:"

    def key(self, route: str, correlation_id: str) -> str:
        """The binding of requests from reply route ``route`` under ``correlation_id``."""
        return f"{self._prefix}{route}:{correlation_id}"

    def answered_key(self, route: str, correlation_id: str) -> str:
        """The instances that answered a control command so far."""
        return f"{self._prefix}answered:{route}:{correlation_id}"

    async def __call__(self, passage: Passage) -> None:
        kind, _, rest = passage.routing_key.partition(".")
        if kind in ("_req", "_ctl"):
            await self._bind(passage, addressed=rest.split(".", 1)[0], control=kind == "_ctl")
        elif kind in ("_reply", "_err"):
            # An error on a sender's error route answers what came from its reply route.
            await self._take(passage, route=f"_reply.{rest}")

    async def _bind(self, passage: Passage, *, addressed: str, control: bool) -> None:
        incoming = passage.incoming
        route, correlation_id = incoming.reply_to, incoming.correlation_id
        if not route or not correlation_id:
            return  # it wants no reply, and nothing can answer it
        words = route.split(".")
        try:
            if len(words) != 3 or words[0] != "_reply":
                raise TopicError(f"{route!r} is not _reply.<agent>.<instance>")
            topology.check_name("agent id", words[1])
            topology.check_name("instance id", words[2])
        except TopicError as exc:
            raise Denied(self.name, f"reply_to is not a reply route: {exc}") from None
        value = f"{CONTROL}{addressed}" if control else addressed
        ttl = _lifetime_ms(incoming.expiration)
        try:
            await self._pipe.call("SET", self.key(route, correlation_id), value, "PX", ttl)
        except REDIS_DOWN as exc:
            raise Unavailable(_unavailable(exc)) from exc

    async def _take(self, passage: Passage, *, route: str) -> None:
        incoming = passage.incoming
        correlation_id = incoming.correlation_id
        if not correlation_id:
            raise Denied(self.name, NO_BINDING)
        agent = incoming.app_id or ""
        instance = passage.headers.get(H_INSTANCE)
        instance = instance if isinstance(instance, str) else ""
        try:
            outcome = await self._pipe.call(
                "EVAL",
                _TAKE,
                2,
                self.key(route, correlation_id),
                self.answered_key(route, correlation_id),
                agent,
                instance,
                topology.INTERNAL_TTL_MS,
            )
        except REDIS_DOWN as exc:
            raise Unavailable(_unavailable(exc)) from exc
        status = int(outcome[0])
        if status == 1:
            return
        if status == 2:
            bound = _text(outcome[1])
            raise Denied(self.name, f"reply from {agent!r} to a request addressed to {bound!r}")
        if status == 3:
            raise Denied(self.name, f"{agent}/{instance} answered this control command already")
        raise Denied(self.name, NO_BINDING)


def _lifetime_ms(expiration: Any) -> int:
    """A binding's TTL: the request's expiration, at most the internal lane's TTL.

    The expiration counts from the caller's send, the binding from a little later (the
    time the request waited for the gateway): it outlives the caller's wait by that much.
    """
    if isinstance(expiration, int | float) and math.isfinite(expiration):
        return max(1, min(topology.INTERNAL_TTL_MS, math.ceil(expiration * 1000)))
    return topology.INTERNAL_TTL_MS


def _unavailable(exc: BaseException) -> str:
    return f"reply binding unavailable (Redis: {type(exc).__name__}: {exc})"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
