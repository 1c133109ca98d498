"""``/agents``: the registry as the caller may see it, requests to an agent's operations, and
control of its behaviours."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mesh.bridge import inputs
from mesh.bridge.errors import ApiError
from mesh.bridge.models import Agents, ControlResult
from mesh.bridge.service import bridge_of
from mesh.membership import REDIS_DOWN
from mesh.registry import AgentRecord

COMMANDS = {"start": "start_behaviour", "stop": "stop_behaviour"}


async def list_agents(request: Request) -> Response:
    """The agents the caller may see.
    ---
    summary: List the agents the caller may see, with instances, behaviours and states
    description: >
      From the registry. A caller sees an agent when the policy lets it ping the agent or
      request one of the operations it serves.
    parameters:
      - {name: capability, in: query, required: false, schema: {type: string}}
      - {name: topic, in: query, required: false, schema: {type: string},
         description: Only agents with a behaviour that would receive this topic.}
      - {name: alive, in: query, required: false, schema: {type: boolean, default: true},
         description: "false: also instances whose lease lapsed lately."}
    responses:
      "200":
        description: The agents.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Agents"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    bridge = bridge_of(request)
    caller = bridge.auth.caller(request)
    capability = request.query_params.get("capability")
    topic = request.query_params.get("topic")
    if topic is not None:
        topic = inputs.topic(topic)
    alive = inputs.query_bool(request, "alive", True)
    try:
        found = await bridge.agent.registry.agents(capability=capability, topic=topic, alive=alive)
    except REDIS_DOWN as exc:
        raise ApiError(503, f"the registry (Redis) did not answer: {exc}") from None
    shown = [a for a in found if bridge.access.may_see(caller, a.agent, a.instances)]
    return JSONResponse(Agents(agents=shown).model_dump(mode="json"))


async def show_agent(request: Request) -> Response:
    """One agent.
    ---
    summary: One agent with its instances, behaviours and states
    parameters:
      - {$ref: "#/components/parameters/agent"}
      - {name: alive, in: query, required: false, schema: {type: boolean, default: true}}
    responses:
      "200":
        description: The agent.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/AgentRecord"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "404": {$ref: "#/components/responses/NotFound"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    bridge = bridge_of(request)
    caller = bridge.auth.caller(request)
    agent = inputs.name("agent id", request.path_params["agent"])
    alive = inputs.query_bool(request, "alive", True)
    try:
        record: AgentRecord | None = await bridge.agent.registry.agent(agent, alive=alive)
    except REDIS_DOWN as exc:
        raise ApiError(503, f"the registry (Redis) did not answer: {exc}") from None
    if record is None or not bridge.access.may_see(caller, agent, record.instances):
        raise ApiError(404, f"no agent {agent!r} that you may see is in the registry")
    return JSONResponse(record.model_dump(mode="json"))


async def rpc(request: Request) -> Response:
    """Call an operation and answer its reply.
    ---
    summary: Call an agent's operation (request/reply) on the caller's behalf
    description: >
      The body (any JSON) is the request's payload; the answer is the reply's payload.
    parameters:
      - {$ref: "#/components/parameters/agent"}
      - {$ref: "#/components/parameters/operation"}
      - {$ref: "#/components/parameters/timeout"}
      - {$ref: "#/components/parameters/schema"}
    requestBody:
      required: false
      content:
        application/json:
          schema: {}
    responses:
      "200":
        description: The reply's payload.
        content:
          application/json:
            schema: {}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "413": {$ref: "#/components/responses/TooLarge"}
      "422": {$ref: "#/components/responses/SchemaViolation"}
      "502": {$ref: "#/components/responses/RemoteError"}
      "503": {$ref: "#/components/responses/Unavailable"}
      "504": {$ref: "#/components/responses/Timeout"}
    """
    bridge = bridge_of(request)
    caller = bridge.auth.caller(request)
    timeout = _timeout(request, bridge.settings.request_timeout)
    schema = inputs.schema_id(request)
    payload = await inputs.read_json(request, bridge.config.max_body)
    reply = await bridge.actions.request(
        caller,
        request.path_params["agent"],
        request.path_params["operation"],
        payload,
        timeout=timeout,
        schema=schema,
    )
    return JSONResponse(reply)


async def behaviour(request: Request) -> Response:
    """Start or stop a behaviour in every instance.
    ---
    summary: Start or stop one behaviour of an agent, in every live instance
    parameters:
      - {$ref: "#/components/parameters/agent"}
      - {$ref: "#/components/parameters/behaviour"}
      - {name: command, in: path, required: true, schema: {type: string, enum: [start, stop]}}
      - {$ref: "#/components/parameters/control_timeout"}
    responses:
      "200": {$ref: "#/components/responses/Controlled"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "502": {$ref: "#/components/responses/RemoteError"}
      "503": {$ref: "#/components/responses/Unavailable"}
      "504": {$ref: "#/components/responses/Timeout"}
    """
    bridge = bridge_of(request)
    caller = bridge.auth.caller(request)
    command = COMMANDS.get(request.path_params["command"])
    if command is None:
        raise ApiError(404, "a behaviour takes start or stop")
    name = inputs.name("behaviour", request.path_params["behaviour"])
    timeout = _timeout(request, bridge.config.control_timeout)
    result = await bridge.actions.control(
        caller, request.path_params["agent"], command, {"behaviour": name}, timeout=timeout
    )
    return JSONResponse(ControlResult.model_validate(result).model_dump(mode="json"))


async def shutdown(request: Request) -> Response:
    """Shut every instance of an agent down.
    ---
    summary: Shut down every live instance of an agent
    parameters:
      - {$ref: "#/components/parameters/agent"}
      - {$ref: "#/components/parameters/control_timeout"}
    responses:
      "200": {$ref: "#/components/responses/Controlled"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "401": {$ref: "#/components/responses/Unauthorized"}
      "403": {$ref: "#/components/responses/Forbidden"}
      "404": {$ref: "#/components/responses/NotFound"}
      "502": {$ref: "#/components/responses/RemoteError"}
      "503": {$ref: "#/components/responses/Unavailable"}
      "504": {$ref: "#/components/responses/Timeout"}
    """
    bridge = bridge_of(request)
    caller = bridge.auth.caller(request)
    timeout = _timeout(request, bridge.config.control_timeout)
    result = await bridge.actions.control(
        caller, request.path_params["agent"], "shutdown", {}, timeout=timeout
    )
    return JSONResponse(ControlResult.model_validate(result).model_dump(mode="json"))


def _timeout(request: Request, default: float) -> float:
    return inputs.query_float(
        request, "timeout", default, high=bridge_of(request).config.max_timeout
    )
