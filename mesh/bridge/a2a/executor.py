"""Running an A2A task: one request to a mesh agent, sent on the caller's behalf.

Each task goes through these states, each one an event (and a status update on a stream):

- ``submitted``: the task exists (the message is its history);
- ``working``: the broker took the request (its mesh message id in the task's metadata, to
  find it in the audit trail);
- ``completed``: the reply's payload is the data part of the artifact ``result``;
- ``rejected``: nothing was run: the message asks for no operation or carries no single data
  part (400), the policy or the gateway refused the caller (403, the gateway's reason),
  no instance is alive or none serves the operation (404), the payload breaks the
  operation's schema (422);
- ``failed``: the handler failed (502, its error type and text), no reply in time (504), the
  broker or Redis did not answer (503);
- ``canceled``: the caller canceled it (``CancelTask``).

The status message of a rejected or failed task says why (the text the REST API answers);
its metadata has the same fields as the REST error body (``status``, ``type``, ``error``,
``stage``, ``remote_type`` …).

*Cancel is best effort.* The bridge stops waiting for the reply and the task ends canceled,
but the agent is not told (the mesh has no cancel message): a request still queued expires
at its deadline, a handler that started runs to its end and its reply is dropped.  A cancel
that reaches another replica than the one running the task marks it canceled in Redis; the
replica running it notices at its next step (the reply or the deadline) and stops there.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from a2a.helpers import new_data_part, new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.agent_execution.active_task import TERMINAL_TASK_STATES
from a2a.server.cluster import ConcurrentTaskModificationError, VersionedTaskStore
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import Message, Role, Task, TaskState, TaskStatus, TaskStatusUpdateEvent

from mesh.bridge.a2a.calls import read_call
from mesh.bridge.a2a.context import agent_of, caller_of
from mesh.bridge.agent import tracking
from mesh.bridge.errors import ApiError
from mesh.bridge.service import Bridge
from mesh.envelope import Message as MeshMessage
from mesh.membership import REDIS_DOWN

logger = logging.getLogger(__name__)

REFUSED = frozenset({400, 403, 404, 413, 422})
"""Statuses that mean nothing ran: the task ends rejected (any other error: failed)."""

RESULT = "result"
"""The name of the artifact holding the reply."""

JSON = "application/json"


class _Sent:
    """Hears when the broker took the request (a ``Tracker`` of the bridge's agent)."""

    def __init__(self) -> None:
        self.message_id = ""
        self.taken = asyncio.Event()

    def sending(self, message: MeshMessage) -> None:
        self.message_id = message.message_id

    def confirmed(self, message: MeshMessage) -> None:
        self.taken.set()


class MeshExecutor(AgentExecutor):
    """Runs each task as a request by ``bridge`` for the caller, to the agent of its URL."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self._running: dict[str, ServerCallContext] = {}
        """Tasks waiting for their reply, with their calls' contexts: a cancel takes its task
        out, and then the reply, should it come before the SDK stops the task, is not
        reported."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id, context_id = str(context.task_id), str(context.context_id)
        updater = TaskUpdater(event_queue, task_id, context_id)
        submitted = TaskStatus(state=TaskState.TASK_STATE_SUBMITTED)
        submitted.timestamp.FromDatetime(datetime.now(UTC))
        history = [context.message] if context.message is not None else []
        await event_queue.enqueue_event(
            Task(id=task_id, context_id=context_id, status=submitted, history=history)
        )
        try:
            call = read_call(
                context.message,
                timeout=self.bridge.settings.request_timeout,
                max_timeout=self.bridge.config.max_timeout,
            )
        except ApiError as exc:
            await _ended(updater, exc)
            return
        agent = agent_of(context.call_context)
        # The request runs in a context of its own, where the bridge's agent tells `sent`
        # when the broker took it: then the task is working.
        sent = _Sent()
        own = contextvars.copy_context()
        own.run(tracking.set, sent)
        request = asyncio.create_task(
            self.bridge.actions.request(
                caller_of(context.call_context),
                agent,
                call.operation,
                call.payload,
                timeout=call.timeout,
                schema=call.schema,
            ),
            context=own,
        )
        taken = asyncio.create_task(sent.taken.wait())
        self._running[task_id] = context.call_context
        try:
            await asyncio.wait({request, taken}, return_when=asyncio.FIRST_COMPLETED)
            if sent.taken.is_set():
                await updater.update_status(
                    TaskState.TASK_STATE_WORKING,
                    metadata={
                        "agent": agent,
                        "operation": call.operation,
                        "message_id": sent.message_id,
                    },
                )
            try:
                reply = await request
            except ApiError as exc:
                if task_id in self._running:
                    await _ended(updater, exc)
                return
            if task_id in self._running:
                await updater.add_artifact([new_data_part(reply, media_type=JSON)], name=RESULT)
                await updater.complete()
        finally:
            self._running.pop(task_id, None)
            taken.cancel()
            request.cancel()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        # The SDK cancels `execute` right after this, which stops the request.
        task_id = str(context.task_id)
        if task_id not in self._running:
            return  # over already, or running on another replica: the SDK closes it out
        del self._running[task_id]
        updater = TaskUpdater(event_queue, task_id, str(context.context_id))
        await updater.cancel(
            _agent_text(
                "canceled by the caller: the bridge stopped waiting for the reply (the agent "
                "is not told: a handler that started runs to its end, its reply is dropped)",
                task_id,
                updater.context_id,
            )
        )

    def running(self) -> dict[str, ServerCallContext]:
        """The tasks waiting for their reply here, with their calls' contexts."""
        return dict(self._running)

    async def abandon(
        self, tasks: Mapping[str, ServerCallContext], store: VersionedTaskStore
    ) -> None:
        """Record ``tasks`` failed: this replica stops without their replies (other replicas
        would show them working until they expire)."""
        error = ApiError(503, "the bridge replica running the task stopped before the reply came")
        for task_id, context in tasks.items():
            try:
                stored = await store.get(task_id, context)
                if stored is None or stored.task.status.state in TERMINAL_TASK_STATES:
                    continue
                task = Task()
                task.CopyFrom(stored.task)
                task.status.CopyFrom(_failed(error, task))
                task.metadata.update(_detail(error))
                update = TaskStatusUpdateEvent(
                    task_id=task.id, context_id=task.context_id, status=task.status
                )
                await store.save(
                    task,
                    event=update,
                    prev=stored.task,
                    prev_version=stored.version,
                    context=context,
                )
            except (ConcurrentTaskModificationError, *REDIS_DOWN) as exc:
                logger.warning("A2A task %s is left as it was (%s)", task_id, exc)


async def _ended(updater: TaskUpdater, error: ApiError) -> None:
    """End the task rejected (nothing ran) or failed, saying why."""
    refused = error.status in REFUSED
    await updater.update_status(
        TaskState.TASK_STATE_REJECTED if refused else TaskState.TASK_STATE_FAILED,
        _agent_text(error.error, updater.task_id, updater.context_id),
        metadata=_detail(error),
    )


def _detail(error: ApiError) -> dict[str, Any]:
    """What the REST API would answer, as the task's metadata."""
    return {"status": error.status, **error.body()}


def _failed(error: ApiError, task: Task) -> TaskStatus:
    status = TaskStatus(
        state=TaskState.TASK_STATE_FAILED,
        message=_agent_text(error.error, task.id, task.context_id),
    )
    status.timestamp.FromDatetime(datetime.now(UTC))
    return status


def _agent_text(text: str, task_id: str, context_id: str) -> Message:
    return new_text_message(text, context_id=context_id, task_id=task_id, role=Role.ROLE_AGENT)
