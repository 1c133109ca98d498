"""The Starlette app: the REST routes, ``/ws``, ``/stream``, A2A at ``/a2a``, the API's document
and page, and the static files (the dashboard) at ``/``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from importlib import metadata, resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from mesh.bridge import a2a, errors, sse
from mesh.bridge.errors import ApiError
from mesh.bridge.openapi import OpenAPI
from mesh.bridge.routes import agents, audit, dead, health, topics
from mesh.bridge.service import Bridge
from mesh.bridge.websocket import websocket_endpoint

STATIC = Path(str(resources.files("mesh.bridge").joinpath("static")))
"""Served at ``/`` (``index.html`` for the directory): the dashboard's files."""


def _version() -> str:
    try:
        return metadata.version("agentmesh")
    except metadata.PackageNotFoundError:
        return "0"


def create_app(bridge: Bridge, *, static: Path = STATIC) -> Starlette:
    """The bridge's ASGI app.  Its lifespan starts ``bridge`` unless it runs already (a test
    may start it itself: httpx's ASGI transport runs no lifespan) and then stops it, after
    the A2A tasks running here (``mesh.bridge.a2a``)."""
    api = OpenAPI(bridge.config, _version())
    agents_a2a = a2a.mount(bridge)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if not bridge.started:
                await stack.enter_async_context(bridge)
            stack.push_async_callback(agents_a2a.aclose)
            yield

    routes = [
        Route("/health", health.health, methods=["GET"]),
        Route("/ready", health.ready, methods=["GET"]),
        Route("/agents", agents.list_agents, methods=["GET"]),
        Route("/agents/{agent}", agents.show_agent, methods=["GET"]),
        Route("/agents/{agent}/rpc/{operation}", agents.rpc, methods=["POST"]),
        Route(
            "/agents/{agent}/behaviours/{behaviour}/{command}",
            agents.behaviour,
            methods=["POST"],
        ),
        Route("/agents/{agent}/shutdown", agents.shutdown, methods=["POST"]),
        Route("/topics/{topic}", topics.publish, methods=["POST"]),
        Route("/audit", audit.audit, methods=["GET"]),
        Route("/dead", dead.list_dead, methods=["GET"]),
        Route("/dead/{id}/redrive", dead.redrive, methods=["POST"]),
        Route("/stream", sse.stream, methods=["GET"]),
        WebSocketRoute("/ws", websocket_endpoint),
        Route("/openapi.json", api.openapi_json, methods=["GET"], include_in_schema=False),
        Route("/docs", api.docs_page, methods=["GET"], include_in_schema=False),
        Mount("/a2a", routes=agents_a2a.routes),
        Mount("/", StaticFiles(directory=static, html=True), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: errors.on_api_error,
            HTTPException: errors.on_http_exception,
            Exception: errors.on_unexpected,
        },
    )
    app.state.bridge = bridge
    return app
