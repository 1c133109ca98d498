"""A2A tasks kept in Redis, so that every bridge replica answers for a task any of them
started (``GetTask``, ``CancelTask``, ``SubscribeToTask``).

A task is the hash ``<namespace>:a2a:tasks:<id>``: ``principal`` and ``agent`` (whose task it
is: the caller's token principal and the agent the URL named), ``version`` (counts writes),
``terminal`` and ``task`` (the protobuf ``Task``).  Each write that applies an event also
appends the event to the stream ``<namespace>:a2a:events:<id>`` (``version``, ``event``: a
protobuf ``StreamResponse``), which ``RedisTaskEvents`` replays to subscribers on other
replicas.  Both keys expire ``ttl`` after the last write.

The SDK's ``VersionedTaskStore`` contract: a write names the version it was derived from and
fails (``ConcurrentTaskModificationError``) if the stored one moved on, except a write to
CANCELED, which overwrites any task not yet terminal.  So a replica that cancels a task
another one runs writes CANCELED here, and the one running it finds its next write refused,
rereads the task and stops.  Beyond the contract, a terminal task takes no write at all: the
SDK, having reread a task canceled elsewhere, still applies the events its executor had
queued, and the reply's COMPLETED would overwrite CANCELED.  One Lua script makes each write
atomic.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from a2a.server.agent_execution.active_task import TERMINAL_TASK_STATES
from a2a.server.cluster import (
    ConcurrentTaskModificationError,
    StoredTask,
    TaskVersion,
    VersionedTaskStore,
)
from a2a.server.context import ServerCallContext
from a2a.server.events import Event
from a2a.types import ListTasksRequest, ListTasksResponse, Task, TaskState
from a2a.utils.errors import UnsupportedOperationError
from a2a.utils.proto_utils import to_stream_response

from mesh.bridge.a2a.context import agent_of, principal_of

TASK_TTL = 3600.0
"""Seconds a task is kept after its last change."""

EVENTS_KEPT = 64
"""Events a task's stream keeps (a mesh call has four or five)."""

_SAVE = """
local held = redis.call('HMGET', KEYS[1], 'principal', 'agent', 'version', 'terminal')
local version = held[3] and tonumber(held[3]) or 0
if (held[1] and (held[1] ~= ARGV[1] or held[2] ~= ARGV[2])) or held[4] == '1' then
  return 0
end
if ARGV[4] == '1' then
  if version == 0 then
    return 0
  end
elseif version ~= tonumber(ARGV[3]) then
  return 0
end
version = version + 1
redis.call('HSET', KEYS[1], 'principal', ARGV[1], 'agent', ARGV[2], 'version', version,
  'terminal', ARGV[6], 'task', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
if ARGV[7] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[9], '*', 'version', version, 'event', ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
end
return version
"""
"""KEYS: the task, its events.  ARGV: principal, agent, the version written from, whether
this write cancels, the task, whether it is terminal, the event (or ''), the TTL in ms, the
events kept.  Returns the new version, or 0 when the write is refused: someone else's task, a
task over already (a terminal state is final), a stale version, a cancel of a task gone."""


class RedisTaskStore(VersionedTaskStore):
    """Tasks in Redis under ``namespace``, each its caller's and its agent's alone: another
    principal, or the same one at another agent's URL, finds no such task."""

    def __init__(self, redis: aioredis.Redis, namespace: str, *, ttl: float = TASK_TTL) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl_ms = max(1, round(ttl * 1000))
        self._save = redis.register_script(_SAVE)

    def task_key(self, task_id: str) -> str:
        return f"{self.namespace}:a2a:tasks:{task_id}"

    def events_key(self, task_id: str) -> str:
        return f"{self.namespace}:a2a:events:{task_id}"

    async def save(
        self,
        task: Task,
        *,
        event: Event | None,
        prev: Task | None,
        prev_version: TaskVersion,
        context: ServerCallContext,
    ) -> TaskVersion:
        del prev  # the whole task is written each time
        written = await self._save(
            keys=[self.task_key(task.id), self.events_key(task.id)],
            args=[
                principal_of(context),
                agent_of(context),
                _number(prev_version),
                "1" if task.status.state == TaskState.TASK_STATE_CANCELED else "0",
                task.SerializeToString(),
                "1" if task.status.state in TERMINAL_TASK_STATES else "0",
                b"" if event is None else to_stream_response(event).SerializeToString(),
                self.ttl_ms,
                EVENTS_KEPT,
            ],
        )
        if not written:
            raise ConcurrentTaskModificationError(task.id)
        return TaskVersion(int(written))

    async def get(self, task_id: str, context: ServerCallContext) -> StoredTask | None:
        fields: list[Any] = await self.redis.hmget(
            self.task_key(task_id), ["principal", "agent", "version", "task"]
        )
        principal, agent, version, data = fields
        if data is None or (_text(principal), _text(agent)) != (
            principal_of(context),
            agent_of(context),
        ):
            return None
        return StoredTask(Task.FromString(data), TaskVersion(int(version)))

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        # Listing would need an index per caller; a task is asked for by its id.
        raise UnsupportedOperationError(
            message="ListTasks is not offered by the mesh bridge: ask for a task by its id "
            "(GetTask)"
        )

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        if await self.get(task_id, context) is not None:
            await self.redis.delete(self.task_key(task_id), self.events_key(task_id))


def _number(version: TaskVersion) -> int:
    """The count a version wraps (``MISSING`` is 0: nothing written yet)."""
    if version.is_missing:
        return 0
    value: Any = version._value  # TaskVersion shows its value to no one but its store
    return int(value)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
