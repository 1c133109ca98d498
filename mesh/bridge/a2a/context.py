"""Who calls and which agent: what the A2A handler learns of each request.

The bridge checks the bearer token before the SDK sees the request (a 401 must be an HTTP
answer with ``WWW-Authenticate``, not a JSON-RPC error), puts the ``Caller`` in the ASGI
scope, and this builder hands it on in the SDK's ``ServerCallContext`` with the agent the
URL names.  The token itself goes no further: the ``Authorization`` header is left out of
the headers the context keeps, which the SDK logs at debug level.
"""

from __future__ import annotations

from a2a.auth.user import User
from a2a.server.context import ServerCallContext
from a2a.server.routes import DefaultServerCallContextBuilder
from starlette.requests import Request

from mesh.bridge.auth import Caller

CALLER = "mesh.caller"
"""Where the verified ``Caller`` is kept: in the ASGI scope, then in the context's state."""
AGENT = "mesh.agent"
"""The agent the URL names (``/a2a/{agent}``), in the context's state."""


class CallerUser(User):
    """The SDK's view of a bridge caller."""

    def __init__(self, caller: Caller) -> None:
        self.caller = caller

    @property
    def is_authenticated(self) -> bool:
        return self.caller.principal is not None

    @property
    def user_name(self) -> str:
        return self.caller.name


class BridgeContextBuilder(DefaultServerCallContextBuilder):
    """Builds each call's context from the caller and agent the bridge put in the scope."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        headers = context.state.get("headers", {})
        context.state["headers"] = {k: v for k, v in headers.items() if k != "authorization"}
        context.state[CALLER] = request.scope[CALLER]
        context.state[AGENT] = request.path_params["agent"]
        return context

    def build_user(self, request: Request) -> User:
        return CallerUser(request.scope[CALLER])


def caller_of(context: ServerCallContext) -> Caller:
    caller = context.state[CALLER]
    assert isinstance(caller, Caller)
    return caller


def principal_of(context: ServerCallContext) -> str:
    """Whose tasks these are: the caller's principal (``anonymous`` in open mode)."""
    return caller_of(context).name


def agent_of(context: ServerCallContext) -> str:
    agent = context.state[AGENT]
    assert isinstance(agent, str)
    return agent
