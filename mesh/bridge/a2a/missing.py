"""``/a2a/…`` without the A2A extra: 501, saying how to enable it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from mesh.bridge.errors import ApiError

INSTALL = "pip install 'agentmesh[a2a]'"

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class Missing:
    """Routes that answer every ``/a2a/…`` request 501."""

    def __init__(self) -> None:
        self.routes: list[BaseRoute] = [
            Route("/{path:path}", self.answer, methods=METHODS, include_in_schema=False)
        ]

    async def answer(self, request: Request) -> Response:
        raise ApiError(
            501,
            "A2A is not enabled on this bridge: the A2A SDK (a2a-sdk) is not installed; "
            f"install it with: {INSTALL}",
            kind="NotImplemented",
        )

    async def aclose(self) -> None:
        return None
