"""A2A on the bridge: the agent cards and the JSON-RPC endpoint, served by the A2A SDK.

``GET /a2a/{agent}/.well-known/agent-card.json`` answers the agent's card for the caller
(404 for an agent the caller may not see, as ``GET /agents/{agent}``); ``POST /a2a/{agent}``
is the JSON-RPC binding (``SendMessage``, ``SendStreamingMessage``, ``GetTask``,
``CancelTask``, ``SubscribeToTask``, and the 0.3 names ``message/send``, ``message/stream``,
``tasks/get``, ``tasks/cancel``, ``tasks/resubscribe``).  Both take the bridge's bearer
tokens (401 without one) and a body of at most ``max_body``.  One SDK request handler serves
every agent: the agent is the URL's, carried in each call's context (``context``).
"""

from __future__ import annotations

import logging
from importlib import metadata

from a2a.server.request_handlers import DefaultRequestHandlerV2
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message

from mesh.bridge import inputs
from mesh.bridge.a2a.cards import Cards, bridge_card
from mesh.bridge.a2a.context import CALLER, BridgeContextBuilder
from mesh.bridge.a2a.events import RedisTaskEvents
from mesh.bridge.a2a.executor import MeshExecutor
from mesh.bridge.a2a.tasks import TASK_TTL, RedisTaskStore
from mesh.bridge.errors import ApiError
from mesh.bridge.service import Bridge
from mesh.membership import REDIS_DOWN

logger = logging.getLogger(__name__)

CARD_PATH = "/.well-known/agent-card.json"


class A2AServer:
    """The A2A routes of ``bridge``, mounted at ``/a2a``; ``aclose`` when it stops."""

    def __init__(self, bridge: Bridge, *, task_ttl: float = TASK_TTL) -> None:
        self.bridge = bridge
        redis = bridge.agent.redis
        self.store = RedisTaskStore(redis, bridge.settings.namespace, ttl=task_ttl)
        self.cards = Cards(bridge.access, bridge.policy.schemas if bridge.policy else None)
        # The handler reads the card only for what every agent's card says alike (streaming).
        template = bridge_card(
            "/a2a",
            name=bridge.agent.id,
            description="The mesh's agents through the agentmesh bridge.",
            version="any",
            secured=bridge.policy is not None,
            extension={},
        )
        template.skills.add(
            id="mesh-request",
            name="mesh request",
            description="Each agent's card lists its operations as skills.",
            tags=["mesh"],
        )
        self.executor = MeshExecutor(bridge)
        self.handler = DefaultRequestHandlerV2(
            self.executor,
            self.store,
            template,
            event_stream=RedisTaskEvents(redis, self.store),
        )
        self.dispatcher = JsonRpcDispatcher(
            self.handler, BridgeContextBuilder(), enable_v0_3_compat=True
        )
        self.routes: list[BaseRoute] = [
            Route("/{agent}" + CARD_PATH, self.card, methods=["GET"], include_in_schema=False),
            Route("/{agent}", self.rpc, methods=["POST"], include_in_schema=False),
        ]
        logger.info(
            "A2A at /a2a/{agent} (a2a-sdk %s): JSON-RPC, protocol 1.0 and 0.3",
            metadata.version("a2a-sdk"),
        )

    async def card(self, request: Request) -> Response:
        """The agent's card, as the caller may see the agent."""
        caller = self.bridge.auth.caller(request)
        agent = inputs.name("agent id", request.path_params["agent"])
        try:
            record = await self.bridge.agent.registry.agent(agent)
        except REDIS_DOWN as exc:
            raise ApiError(503, f"the registry (Redis) did not answer: {exc}") from None
        if record is None or not self.bridge.access.may_see(caller, agent, record.instances):
            raise ApiError(404, f"no agent {agent!r} that you may see is in the registry")
        url = str(request.url.replace(query="", fragment="")).removesuffix(CARD_PATH)
        return JSONResponse(agent_card_to_dict(self.cards.card(caller, record, url)))

    async def rpc(self, request: Request) -> Response:
        """A JSON-RPC call, once the caller's token checked and its body read (bounded)."""
        caller = self.bridge.auth.caller(request)
        inputs.name("agent id", request.path_params["agent"])
        body = await _body(request, self.bridge.config.max_body)
        request.scope[CALLER] = caller

        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.dispatcher.handle_requests(Request(request.scope, receive))

    async def aclose(self) -> None:
        """Stop the tasks running here and record them failed: their replies would come to
        this replica, which stops waiting for them."""
        running = self.executor.running()
        await self.handler.aclose()
        await self.executor.abandon(running, self.store)


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is larger than {limit} bytes", limit=limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes", limit=limit)
    return bytes(body)
