"""``GET /audit``: the gateway's audit trail, as far as the caller may see it."""

from __future__ import annotations

from datetime import datetime

from redis.exceptions import NoPermissionError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mesh.audit import DECISIONS, AuditEntry, AuditError, AuditFilter, AuditReader
from mesh.bridge.errors import ApiError
from mesh.bridge.models import AuditPage
from mesh.bridge.service import bridge_of
from mesh.membership import REDIS_DOWN
from mesh.topology import TopicError, check_binding

MAX_LIMIT = 500
SCANNED = 10_000
"""Records one query reads at most: the trail has no index by principal or topic, and a
caller who may see little must not make the bridge read it all."""


async def audit(request: Request) -> Response:
    """The newest audit records the caller may see.
    ---
    summary: Query the audit trail (the records the caller may see), newest first
    description: >
      A caller sees the records of its own actions and of events on topics it may subscribe
      to. Filters apply as records are read; at most 10,000 are read per query (complete
      says whether that was all of them in range).
    parameters:
      - {name: principal, in: query, required: false, schema: {type: string}}
      - {name: agent, in: query, required: false, schema: {type: string}}
      - {name: topic, in: query, required: false, schema: {type: string},
         description: "A routing key pattern (vehicle.*.speed, _req.v7.#)."}
      - {name: decision, in: query, required: false,
         schema: {type: string, enum: [allowed, denied, redacted, would-deny]}}
      - {name: since, in: query, required: false, schema: {type: string},
         description: "ISO 8601 time, or Unix seconds."}
      - {name: until, in: query, required: false, schema: {type: string}}
      - {name: limit, in: query, required: false,
         schema: {type: integer, minimum: 1, maximum: 500, default: 100}}
    responses:
      "200":
        description: The records, newest first.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/AuditPage"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    bridge = bridge_of(request)
    caller = bridge.auth.caller(request)
    query = request.query_params
    decision = query.get("decision")
    if decision is not None and decision not in DECISIONS:
        raise ApiError(400, f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    topic = query.get("topic")
    if topic is not None:
        try:
            check_binding(topic)
        except TopicError as exc:
            raise ApiError(400, str(exc)) from None
    where = AuditFilter(
        principal=query.get("principal"),
        agent=query.get("agent"),
        topic=topic,
        decision=decision,
    )
    limit = _limit(query.get("limit"))
    since, until = _time_ms(query.get("since"), "since"), _time_ms(query.get("until"), "until")
    reader = AuditReader(bridge.agent.redis, bridge.settings.namespace, scan=False)
    shown: list[AuditEntry] = []
    scanned, complete = 0, True
    try:
        # Unfiltered here: each record read counts against the bound, shown or not.
        async for entry in reader.entries(since_ms=since, until_ms=until, newest_first=True):
            if scanned >= SCANNED:
                complete = False
                break
            scanned += 1
            if where.accepts(entry.record) and bridge.access.may_read(caller, entry.record):
                shown.append(entry)
                if len(shown) >= limit:
                    complete = False
                    break
    except NoPermissionError:
        raise ApiError(
            503,
            "the bridge's Redis user may not read the audit trail: provision it again "
            "(mesh provision policy.yaml)",
        ) from None
    except (*REDIS_DOWN, AuditError) as exc:
        raise ApiError(503, f"the audit trail (Redis) could not be read: {exc}") from None
    page = AuditPage(records=shown, scanned=scanned, complete=complete)
    return JSONResponse(page.model_dump(mode="json", exclude_none=True))


def _limit(raw: str | None) -> int:
    if raw is None:
        return 100
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, f"query parameter 'limit' must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _time_ms(raw: str | None, name: str) -> int | None:
    """``raw`` (ISO 8601, or Unix seconds) in Unix milliseconds."""
    if raw is None:
        return None
    seconds = _seconds(raw)
    if seconds is None:
        try:
            moment = datetime.fromisoformat(raw)
        except ValueError:
            raise ApiError(
                400, f"query parameter {name!r} must be an ISO 8601 time or Unix seconds"
            ) from None
        if moment.tzinfo is None:
            raise ApiError(400, f"query parameter {name!r} needs a time zone (Z, +02:00)")
        seconds = moment.timestamp()
    if not 0 <= seconds < 2**42:
        raise ApiError(400, f"query parameter {name!r} is out of range")
    return int(seconds * 1000)


def _seconds(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None
