"""The websocket protocol at ``/ws``: live messages, publishing and requests, in JSON frames.

Connect with ``Authorization: Bearer <token>`` or, from a browser, ``/ws?access_token=<token>``.
The bridge accepts, then closes at once with ``4401`` when the token is missing, unknown or
revoked; otherwise its first frame is ``{"type": "welcome", "principal": NAME, "buffer":
{"frames": N, "bytes": B}}``.

Each client frame is one JSON object with an ``op``; ``id`` is any string the client picks,
echoed in every frame about that operation:

- ``{"op": "subscribe", "id": "s1", "topics": ["vehicle.*.speed"], "agents": true}``: receive
  messages on these topic patterns (``*`` one word, ``#`` any), and with ``agents`` the
  registry's events.  All or nothing: a pattern the policy does not let the caller
  subscribe to refuses the whole frame (``error`` 403).  Answer ``{"type": "subscribed",
  "id": "s1", "topics": [every pattern held], "agents": bool}``; messages published after
  it are delivered.
- ``{"op": "unsubscribe", "id": "u1", "topics": [...], "agents": true}``: answer
  ``unsubscribed``, as ``subscribed``.
- ``{"op": "publish", "id": "p1", "topic": "notes.today", "payload": {...}, "schema":
  "note@1"}``: publish on the caller's behalf.  ``accepted`` (with ``message_id``) once the
  broker confirmed it; then ``failed`` (``status`` 403, ``error_type`` ``Denied``, the
  gateway's ``error`` and ``stage``) if the gateway refuses it, or ``delivered`` if the
  bridge receives the relayed copy, which it does only while some client of the bridge
  subscribes to the topic: the gateway tells a sender of a refusal, never of a pass, so an
  event may stay ``accepted``.
- ``{"op": "request", "id": "r1", "agent": "v7", "operation": "status", "payload": {},
  "timeout": 5, "schema": null}``: call an operation.  ``accepted`` once the broker
  confirmed the request, then ``completed`` (``result``: the reply's payload), ``failed``
  (``status`` and ``error_type``: 403 ``Denied`` by the gateway, 404 ``NoLiveInstance`` or
  ``Unroutable``, 502 the handler's error) or ``timeout`` (``timeout``, ``deadline``).  There
  is no ``delivered``: nothing tells the sender that the gateway passed a request; a reply,
  or a failure other than ``Denied``, says it did.

Frames from the bridge, each with a ``type``: ``message`` (``topic``, ``message_id``,
``sender`` and ``instance``, ``user`` (the sender's broker user, as the broker verified
it), ``on_behalf_of``, ``timestamp``, ``schema``, ``audit_id``, ``redacted``, ``payload``),
``agent`` (``event`` ``join``/``behaviour``/``leave``, ``agent``, ``instance``, and but for a
leave the instance's ``record``), the answers above, and ``error`` (``id``, ``status``,
``error_type``, ``error``) for a frame refused before anything was sent: not JSON, an unknown
``op`` or wrong fields (400), the policy (403), the payload's schema (422), more than
``in_flight`` operations outstanding (429), the broker unreachable (503).

What a client receives waits in its own bounded buffer (``send_buffer`` frames,
``send_buffer_bytes``); a client that lets it fill is closed with ``4008`` and never slows
the mesh or another client.  Other close codes: ``4401`` (token missing, unknown, or revoked
while connected: checked at each operation and every ``recheck`` seconds), ``1009`` (a frame
over ``max_body``), ``1001`` (the bridge is stopping).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from mesh.bridge import inputs
from mesh.bridge.agent import tracking
from mesh.bridge.auth import Caller
from mesh.bridge.errors import ApiError
from mesh.bridge.outbox import SLOW_CLIENT, Outbox
from mesh.bridge.service import Bridge, bridge_of
from mesh.bridge.stream import Subscriber
from mesh.envelope import Message

logger = logging.getLogger(__name__)

UNAUTHORIZED = 4401
"""Close code: no token, an unknown one, or one revoked while connected."""
GOING_AWAY = 1001
CLOSE_WITHIN = 10.0
"""Seconds the bridge waits to send a close frame to a client that reads nothing."""


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, max_length=256)


class Subscribe(_Op):
    op: Literal["subscribe"]
    topics: list[str] = []
    agents: bool = False


class Unsubscribe(_Op):
    op: Literal["unsubscribe"]
    topics: list[str] = []
    agents: bool = False


class Publish(_Op):
    op: Literal["publish"]
    topic: str
    payload: Any = None
    schema_: str | None = Field(default=None, alias="schema", max_length=inputs.MAX_SCHEMA_ID)


class Request(_Op):
    op: Literal["request"]
    agent: str
    operation: str
    payload: Any = None
    timeout: float | None = Field(default=None, gt=0)
    schema_: str | None = Field(default=None, alias="schema", max_length=inputs.MAX_SCHEMA_ID)


Operation = Annotated[Subscribe | Unsubscribe | Publish | Request, Field(discriminator="op")]
_OPERATION: TypeAdapter[Operation] = TypeAdapter(Operation)


def _invalid(exc: ValidationError) -> str:
    problems = (
        f"{'.'.join(str(part) for part in error['loc']) or 'frame'}: {error['msg']}"
        for error in exc.errors()[:3]
    )
    return "; ".join(problems)


class _EventTracker:
    """Turns a published event's progress into the client's frames (through ``Outcomes``)."""

    def __init__(self, session: Session, op: str | None) -> None:
        self.session = session
        self.op = op
        self.message_id: str | None = None

    def sending(self, message: Message) -> None:
        self.message_id = message.message_id
        outbox = self.session.subscriber.outbox
        self.session.bridge.outcomes.expect(message.message_id, self.op, outbox.report)

    def confirmed(self, message: Message) -> None:
        self.session.bridge.outcomes.accepted(message.message_id)


class _RequestTracker:
    """Reports a request ``accepted`` once the broker took it."""

    def __init__(self, session: Session, op: str | None) -> None:
        self.session = session
        self.op = op
        self.message_id: str | None = None

    def sending(self, message: Message) -> None:
        self.message_id = message.message_id

    def confirmed(self, message: Message) -> None:
        self.session.report(
            {"type": "accepted", "id": self.op, "message_id": message.message_id}
        )


class Session:
    """One websocket client: its reader, its writer, and what it has in flight."""

    def __init__(self, bridge: Bridge, websocket: WebSocket, caller: Caller) -> None:
        self.bridge = bridge
        self.websocket = websocket
        self.caller = caller
        config = bridge.config
        self.subscriber: Subscriber = bridge.stream.join(
            caller, Outbox(config.send_buffer, config.send_buffer_bytes)
        )
        self.revoked = False
        self.disconnected = False
        self._tasks: set[asyncio.Task[None]] = set()

    def report(self, frame: dict[str, Any]) -> None:
        self.subscriber.outbox.report(frame)

    def refuse(self, op: str | None, error: ApiError) -> None:
        self.report(
            {
                "type": "error",
                "id": op,
                "status": error.status,
                "error_type": error.kind,
                "error": error.error,
            }
        )

    async def run(self) -> None:
        config = self.bridge.config
        self.report(
            {
                "type": "welcome",
                "principal": self.caller.name,
                "buffer": {"frames": config.send_buffer, "bytes": config.send_buffer_bytes},
            }
        )
        outbox = self.subscriber.outbox
        parts = [self._read(), self._write(), self._watch_token(), outbox.ended.wait()]
        tasks = [asyncio.create_task(part) for part in parts]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                failure = None if task.cancelled() else task.exception()
                if failure is not None:
                    logger.error("websocket of %s failed", self.caller.name, exc_info=failure)
        finally:
            for task in [*tasks, *self._tasks]:
                task.cancel()
            await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
            self.bridge.stream.leave(self.subscriber)
        await self._close()

    async def _close(self) -> None:
        if self.disconnected:
            return
        if self.subscriber.outbox.overflowed:
            self.bridge.stream.dropped_slow += 1
            logger.warning(
                "websocket client %s (%s) is too slow: its send buffer filled; closing it (%d)",
                self.websocket.client,
                self.caller.name,
                SLOW_CLIENT,
            )
            code, reason = SLOW_CLIENT, "send buffer full: the client reads too slowly"
        elif self.revoked:
            code, reason = UNAUTHORIZED, "the token was revoked"
        else:
            code, reason = GOING_AWAY, "the bridge is stopping"
        with contextlib.suppress(Exception):  # the client may be gone; nothing to tell it then
            async with asyncio.timeout(CLOSE_WITHIN):
                await self.websocket.close(code, reason)

    async def _write(self) -> None:
        outbox = self.subscriber.outbox
        while (frame := await outbox.next()) is not None:
            try:
                await self.websocket.send_text(frame)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.disconnected = True
                return

    async def _watch_token(self) -> None:
        while True:
            await asyncio.sleep(self.bridge.config.recheck)
            if not self.bridge.auth.still_valid(self.caller):
                self.revoked = True
                return

    async def _read(self) -> None:
        while True:
            try:
                received = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError, OSError):
                received = {"type": "websocket.disconnect"}
            if received["type"] == "websocket.disconnect":
                self.disconnected = True
                return
            if not self.bridge.auth.still_valid(self.caller):
                self.revoked = True
                return
            text = received.get("text")
            if text is None:
                self.refuse(None, ApiError(400, "frames are JSON text, not binary"))
                continue
            await self._handle(text)

    async def _handle(self, text: str) -> None:
        try:
            frame = inputs.parse_json(text)
        except ApiError as exc:
            self.refuse(None, ApiError(400, exc.error.replace("the body", "the frame")))
            return
        op_id = frame.get("id") if isinstance(frame, dict) else None
        try:
            operation = _OPERATION.validate_python(frame)
        except ValidationError as exc:
            self.refuse(op_id if isinstance(op_id, str) else None, ApiError(400, _invalid(exc)))
            return
        if isinstance(operation, Subscribe | Unsubscribe):
            await self._subscription(operation)
        elif len(self._tasks) >= self.bridge.config.in_flight:
            self.refuse(
                operation.id,
                ApiError(429, f"{len(self._tasks)} operations are outstanding already"),
            )
        else:
            task = asyncio.create_task(
                self._publish(operation)
                if isinstance(operation, Publish)
                else self._request(operation)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _subscription(self, operation: Subscribe | Unsubscribe) -> None:
        stream = self.bridge.stream
        try:
            patterns = [inputs.pattern(p) for p in operation.topics]
            if isinstance(operation, Subscribe):
                for pattern in patterns:
                    self.bridge.access.require(self.caller, "subscribe", pattern)
                await stream.subscribe(self.subscriber, patterns, agents=operation.agents)
            else:
                await stream.unsubscribe(self.subscriber, patterns, agents=operation.agents)
        except ApiError as exc:
            self.refuse(operation.id, exc)
            return
        self.report(
            {
                "type": f"{operation.op}d",
                "id": operation.id,
                "topics": sorted(self.subscriber.patterns),
                "agents": self.subscriber.agents,
            }
        )

    async def _publish(self, operation: Publish) -> None:
        tracker = _EventTracker(self, operation.id)
        tracking.set(tracker)
        try:
            await self.bridge.actions.publish(
                self.caller, operation.topic, operation.payload, operation.schema_
            )
        except ApiError as exc:
            if tracker.message_id is not None:
                self.bridge.outcomes.discard(tracker.message_id)
            self.refuse(operation.id, exc)

    async def _request(self, operation: Request) -> None:
        tracker = _RequestTracker(self, operation.id)
        tracking.set(tracker)
        config = self.bridge.config
        timeout = operation.timeout or self.bridge.settings.request_timeout
        try:
            if timeout > config.max_timeout:
                raise ApiError(400, f"timeout must be at most {config.max_timeout:g}")
            result = await self.bridge.actions.request(
                self.caller,
                operation.agent,
                operation.operation,
                operation.payload,
                timeout=timeout,
                schema=operation.schema_,
            )
        except ApiError as exc:
            if tracker.message_id is None:
                self.refuse(operation.id, exc)
            elif exc.status == 504:
                self.report(
                    {"type": "timeout", "id": operation.id, "message_id": tracker.message_id}
                    | exc.extra
                )
            else:
                self.report(
                    {
                        "type": "failed",
                        "id": operation.id,
                        "message_id": tracker.message_id,
                        "status": exc.status,
                        "error_type": exc.extra.get("remote_type", exc.kind),
                        "error": exc.error,
                    }
                )
            return
        self.report(
            {
                "type": "completed",
                "id": operation.id,
                "message_id": tracker.message_id,
                "result": result,
            }
        )


async def websocket_endpoint(websocket: WebSocket) -> None:
    """``/ws``: see the module docstring."""
    bridge = bridge_of(websocket)
    await websocket.accept()
    try:
        caller = bridge.auth.caller(websocket, query=True)
    except ApiError as exc:
        code = UNAUTHORIZED if exc.status == 401 else 1011
        await websocket.close(code, exc.error[:120])
        return
    await Session(bridge, websocket, caller).run()
