"""``GET /stream``: the live stream as Server-Sent Events, for clients that cannot do
websockets (``EventSource``, ``curl -N``).

``/stream?topics=vehicle.*.speed,alerts.%23&agents=true`` subscribes at once (all or
nothing, as the websocket's ``subscribe``: 400 for a bad pattern, 403 for one the policy
denies, before the stream starts).  Each frame the websocket would send is one event, its
``type`` the event name and the frame its JSON ``data``: ``welcome``, ``message``,
``agent``.  A client whose buffer fills gets a last ``error`` event (``code`` 4008) and the
stream ends; so does one whose token is revoked (``code`` 4401).  A comment line every
``keepalive`` seconds of silence keeps proxies from closing the connection.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from mesh.bridge import inputs
from mesh.bridge.auth import Caller
from mesh.bridge.errors import ApiError
from mesh.bridge.outbox import SLOW_CLIENT, Outbox
from mesh.bridge.service import Bridge, bridge_of
from mesh.bridge.stream import Subscriber
from mesh.bridge.websocket import UNAUTHORIZED


async def stream(request: Request) -> Response:
    """Live messages as Server-Sent Events.
    ---
    summary: Live messages on topic patterns, as Server-Sent Events
    description: >
      The same frames as the websocket at /ws, one event each (event: the frame's type,
      data: its JSON). The token may also come as ?access_token= (EventSource sends no
      headers).
    parameters:
      - {name: topics, in: query, required: true, schema: {type: string},
         description: "Topic patterns, comma-separated (vehicle.*.speed,alerts.#)."}
      - {name: agents, in: query, required: false, schema: {type: boolean, default: false},
         description: Also the registry's events (agents joining, changing, leaving).}
      - {name: access_token, in: query, required: false, schema: {type: string}}
    responses:
      "200":
        description: The event stream.
        content:
          text/event-stream:
            schema: {type: string}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
    """
    bridge = bridge_of(request)
    caller = bridge.auth.caller(request, query=True)
    raw = request.query_params.get("topics", "")
    patterns = [inputs.pattern(p.strip()) for p in raw.split(",") if p.strip()]
    agents = inputs.query_bool(request, "agents", False)
    if not patterns and not agents:
        raise ApiError(400, "query parameter 'topics' must name at least one pattern")
    for pattern in patterns:
        bridge.access.require(caller, "subscribe", pattern)
    config = bridge.config
    subscriber = bridge.stream.join(caller, Outbox(config.send_buffer, config.send_buffer_bytes))
    try:
        await bridge.stream.subscribe(subscriber, patterns, agents=agents)
    except BaseException:
        bridge.stream.leave(subscriber)
        raise
    subscriber.outbox.report({"type": "welcome", "principal": caller.name})
    return StreamingResponse(
        _events(bridge, caller, subscriber),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(bridge: Bridge, caller: Caller, subscriber: Subscriber) -> AsyncIterator[str]:
    config = bridge.config
    outbox = subscriber.outbox
    loop = asyncio.get_running_loop()
    checked = sent = loop.time()
    try:
        while True:
            try:
                async with asyncio.timeout(config.recheck):
                    frame = await outbox.next()
            except TimeoutError:
                frame = ""
            now = loop.time()
            if now - checked >= config.recheck:
                checked = now
                if not bridge.auth.still_valid(caller):
                    yield _event("error", {"code": UNAUTHORIZED, "error": "the token was revoked"})
                    return
            if frame is None:
                if outbox.overflowed:
                    bridge.stream.dropped_slow += 1
                    yield _event("error", {"code": SLOW_CLIENT, "error": SLOW})
                return
            if frame:
                sent = now
                yield f"event: {_type(frame)}\ndata: {frame}\n\n"
            elif now - sent >= config.keepalive:
                sent = now
                yield ": keepalive\n\n"
    finally:
        bridge.stream.leave(subscriber)


SLOW = "send buffer full: the client reads too slowly"

_TYPE = re.compile(r'^\{"type":"([a-z_]+)"')


def _type(frame: str) -> str:
    """A frame's ``type``: the bridge writes it first in every frame."""
    found = _TYPE.match(frame)
    return found.group(1) if found else "message"


def _event(name: str, data: dict[str, object]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"
