"""``POST /topics/{topic}``: publish an event for the caller."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mesh.bridge import inputs
from mesh.bridge.models import Accepted
from mesh.bridge.service import bridge_of


async def publish(request: Request) -> Response:
    """Publish the body (any JSON) to a topic.
    ---
    summary: Publish an event on the caller's behalf
    description: >
      The body is the event's payload, any JSON (whatever the Content-Type says). The policy
      and the topic's payload schema are checked first; then the event goes to the gateway,
      sent by the bridge on the caller's behalf (x-mesh-on-behalf-of). 202 once the broker
      confirmed it: the gateway decides again as it passes, and tells nobody of a pass.
    parameters:
      - {$ref: "#/components/parameters/topic"}
      - {$ref: "#/components/parameters/schema"}
    requestBody:
      required: false
      content:
        application/json:
          schema: {}
    responses:
      "202":
        description: The broker took the event.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Accepted"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "413": {$ref: "#/components/responses/TooLarge"}
      "422": {$ref: "#/components/responses/SchemaViolation"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    bridge = bridge_of(request)
    caller = bridge.auth.caller(request)
    topic = request.path_params["topic"]
    schema = inputs.schema_id(request)
    payload = await inputs.read_json(request, bridge.config.max_body)
    message_id = await bridge.actions.publish(caller, topic, payload, schema)
    return JSONResponse(Accepted(message_id=message_id, topic=topic).model_dump(), 202)
