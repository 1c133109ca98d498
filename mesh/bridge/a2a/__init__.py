"""A2A (the Agent2Agent protocol) on the bridge: every mesh agent callable by A2A clients.

Each agent has a card at ``/a2a/{agent}/.well-known/agent-card.json`` and a JSON-RPC
endpoint at ``/a2a/{agent}``; a message names one of its ``@rpc`` operations and carries
the payload as a data part, and becomes a mesh request sent by the bridge on the caller's
behalf, so the gateway's policy, schemas, DLP and audit apply as to any request.  Tasks are
kept in Redis, so any replica of the bridge answers for them.  Built on the official A2A
SDK (``a2a-sdk``), an optional extra: ``pip install 'agentmesh[a2a]'``; without it the
bridge serves everything else and answers ``/a2a/…`` with 501 saying how to enable it.

One module per concept: ``server`` (the routes and the SDK's handler), ``cards`` (agent
cards from the registry), ``calls`` (what a message asks), ``executor`` (a task as a mesh
request), ``tasks`` (the Redis task store), ``events`` (a task's events for other
replicas), ``context`` (the caller and agent of each call), ``missing`` (the 501).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from starlette.routing import BaseRoute

from mesh.bridge.a2a.missing import INSTALL, Missing

if TYPE_CHECKING:
    from mesh.bridge.service import Bridge

__all__ = ["INSTALL", "A2ARoutes", "installed", "mount"]

logger = logging.getLogger(__name__)


class A2ARoutes(Protocol):
    """What the bridge's app mounts at ``/a2a``, and closes when it stops."""

    routes: list[BaseRoute]

    async def aclose(self) -> None: ...


def installed() -> bool:
    """Whether the A2A SDK and the server parts it needs are installed (the extra)."""
    try:
        import a2a.server.routes  # noqa: F401
        import sse_starlette  # noqa: F401
    except ImportError:
        return False
    return True


def mount(bridge: Bridge) -> A2ARoutes:
    """A2A for ``bridge``, or, without the extra, routes answering 501 (and a warning)."""
    if not installed():
        logger.warning(
            "A2A is off: the A2A SDK (a2a-sdk) is not installed; enable it with: %s", INSTALL
        )
        return Missing()
    from mesh.bridge.a2a.server import A2AServer

    return A2AServer(bridge)
