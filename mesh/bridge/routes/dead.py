"""``/dead``: the dead letters in ``mesh.dead``, and redriving one, for the callers the policy
lets redrive them.

Who may: a caller the policy allows to ``request`` the gateway's ``redrive`` operation
(``_req.<gateway>.redrive``), decided by the bridge first (403 otherwise).  The same callers
may list them: a dead letter may hold any payload of any topic, so no narrower rule shows
only what a caller could have received.  Listing reads the stream with the bridge's own
broker user, which may read ``mesh.dead`` and write nothing of it.  Redriving is the
gateway's: the bridge asks it on the caller's behalf like any request, so the gateway decides
again, audits it with the caller as principal and the bridge as ``delegated_by``, and puts a
dead letter back only in its queue owner's name.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiormq.exceptions import AMQPError, ChannelClosed
from pydantic import ValidationError
from redis.exceptions import NoPermissionError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mesh import topology
from mesh.bridge import inputs
from mesh.bridge.auth import Caller
from mesh.bridge.errors import ApiError
from mesh.bridge.models import DeadLetters
from mesh.bridge.service import Bridge, bridge_of
from mesh.deadlist import DeadLetter, DeadLetterReadError, read_dead_letters, stream_end
from mesh.membership import REDIS_DOWN
from mesh.redrive import REDRIVE, RedriveMark, RedriveMarks, RedriveReport, RedriveRequest
from mesh.topology import matches
from mesh.transport import settle

MAX_LIMIT = 1000
SCANNED = 10_000
"""Dead letters one listing reads at most, the newest: a filter must not make the bridge
read a stream of a gigabyte."""
TIMEOUT = 30.0
"""Seconds the gateway has to redrive one (it reads mesh.dead to find it), as ``mesh dead
redrive`` gives it."""
MAX_ID = 2**63 - 1
MAX_QUEUE = 255
"""A queue name's length, at most (AMQP)."""

STATUS = {"unknown": 404, "redriven": 409, "busy": 409, "not allowed": 403, "not sent": 502}
"""A refused redrive's status, by ``RedriveResult.refusal``."""


async def list_dead(request: Request) -> Response:
    """The dead letters, oldest first.
    ---
    summary: List dead letters (mesh.dead), oldest first and the newest last
    description: >
      For callers the policy lets request the gateway's redrive operation. Each with where
      and why it died, who sent it and who dead-lettered it (as the broker verified them),
      and whether it was redriven. At most the newest 10,000 are read (complete says
      whether that was the whole stream); limit keeps the newest N of those that match.
    parameters:
      - {name: topic, in: query, required: false, schema: {type: string},
         description: "A topic pattern (orders.*.new, orders.#)."}
      - {name: queue, in: query, required: false,
         schema: {type: string, minLength: 1, maxLength: 255},
         description: "Only dead letters from this queue (mesh.q.billing.invoices)."}
      - {name: limit, in: query, required: false,
         schema: {type: integer, minimum: 1, maximum: 1000, default: 100}}
    responses:
      "200":
        description: The dead letters.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/DeadLetters"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    bridge = bridge_of(request)
    caller = bridge.auth.caller(request)
    _require(bridge, caller)
    query = request.query_params
    topic = query.get("topic")
    if topic is not None:
        topic = inputs.pattern(topic)
    queue = query.get("queue")
    if queue is not None and not 0 < len(queue) <= MAX_QUEUE:
        raise ApiError(400, f"query parameter 'queue' must be 1 to {MAX_QUEUE} characters")
    limit = _limit(query.get("limit"))
    found, complete = await _read(bridge, topic, queue, limit)
    try:
        marks = await RedriveMarks(bridge.agent.redis, bridge.settings.namespace).of(
            [dead.offset for dead in found]
        )
    except NoPermissionError:
        raise ApiError(
            503,
            "the bridge's Redis user may not read the redrive marks: provision it again "
            "(mesh provision policy.yaml)",
        ) from None
    except REDIS_DOWN as exc:
        raise ApiError(503, f"the redrive marks (Redis) could not be read: {exc}") from None
    listed = [dead.summary() | {"redriven": _mark(marks.get(dead.offset))} for dead in found]
    page = DeadLetters.model_validate({"dead_letters": listed, "complete": complete})
    return JSONResponse(page.model_dump(mode="json"))


async def redrive(request: Request) -> Response:
    """Redrive one dead letter through the gateway.
    ---
    summary: Put a dead letter back into the queue it died in (the gateway does it)
    description: >
      Sent to the gateway's redrive operation on the caller's behalf: it puts the dead
      letter back only if its queue's owner dead-lettered it, audits the decision (the
      caller as principal, the bridge as delegated_by) and marks it redriven. 403 with the
      gateway's reason when it may not go back, 404 for an unknown id, 409 when it was
      redriven already (again=true redrives it once more) or another redrive of it is
      under way.
    parameters:
      - {name: id, in: path, required: true,
         schema: {type: integer, minimum: 0, maximum: 9223372036854775807},
         description: "The dead letter's id (its offset in mesh.dead)."}
      - {name: again, in: query, required: false, schema: {type: boolean, default: false}}
    responses:
      "200":
        description: The dead letter was redriven.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/RedriveResult"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "409": {$ref: "#/components/responses/Conflict"}
      "502": {$ref: "#/components/responses/RemoteError"}
      "503": {$ref: "#/components/responses/Unavailable"}
      "504": {$ref: "#/components/responses/Timeout"}
    """
    bridge = bridge_of(request)
    caller = bridge.auth.caller(request)
    _require(bridge, caller)
    id = _id(request.path_params["id"])
    again = inputs.query_bool(request, "again", False)
    ask = RedriveRequest(ids=[id], again=again).model_dump(mode="json")
    try:
        answer = await bridge.actions.request(
            caller, bridge.config.gateway_id, REDRIVE, ask, timeout=TIMEOUT
        )
    except ApiError as exc:
        if exc.extra.get("remote_type") == "RedriveRefused":
            raise ApiError(403, exc.error, stage="redrive", principal=caller.name) from None
        raise
    try:
        [result] = RedriveReport.model_validate(answer).results
    except (ValidationError, ValueError):
        raise ApiError(502, f"the gateway answered no redrive report: {answer!r:.200}") from None
    if result.outcome != "redriven":
        status = STATUS.get(result.refusal or "not allowed", 403)
        raise ApiError(status, result.reason, **result.model_dump(mode="json", exclude_none=True))
    return JSONResponse(result.model_dump(mode="json", exclude_none=True))


def _require(bridge: Bridge, caller: Caller) -> None:
    """403 unless ``caller`` may request the gateway's ``redrive``."""
    gateway = bridge.config.gateway_id
    bridge.access.require(caller, "request", topology.request_key(gateway, REDRIVE))


async def _read(
    bridge: Bridge, topic: str | None, queue: str | None, limit: int
) -> tuple[list[DeadLetter], bool]:
    """The newest ``limit`` dead letters matching ``topic`` and ``queue`` among the newest
    ``SCANNED``, oldest first; and whether that read the whole stream."""
    try:
        channel = await bridge.agent.transport.open_channel()
    except (AMQPError, ConnectionError, RuntimeError) as exc:  # not connected
        raise ApiError(503, f"the broker did not open a channel: {exc}") from None
    try:
        end = await stream_end(channel)
        if end is None:
            return [], True
        start = max(0, end - SCANNED + 1)
        if topic is None and queue is None:
            start = max(start, end - limit + 1)  # offsets are consecutive
        found = [
            dead
            async for dead in read_dead_letters(channel, end, start)
            if (topic is None or matches(topic, dead.topic))
            and (queue is None or dead.queue == queue)
        ]
    except ChannelClosed as exc:
        raise ApiError(
            503,
            f"the bridge's broker user cannot read mesh.dead ({exc}): provision it again "
            "(mesh provision policy.yaml)",
        ) from None
    except DeadLetterReadError as exc:
        raise ApiError(503, str(exc)) from None
    finally:
        await settle(channel.close())
    return found[-limit:], start == 0


def _mark(mark: RedriveMark | None) -> dict[str, Any] | None:
    if mark is None:
        return None
    when = datetime.fromtimestamp(mark.time, UTC).isoformat(timespec="milliseconds")
    return mark.model_dump(mode="json") | {"time": when}


def _limit(raw: str | None) -> int:
    if raw is None:
        return 100
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, f"query parameter 'limit' must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _id(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_ID:
        raise ApiError(400, f"a dead letter's id is an integer from 0 to {MAX_ID}, not {raw!r:.40}")
    return int(raw)
