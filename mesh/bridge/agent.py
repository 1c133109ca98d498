"""The bridge's agent: its own broker user and instance, sending for its callers.

It hosts no behaviours.  It is registered (``mesh agents`` lists the bridge) and answers
only ``ping`` over the mesh: stopping it is for whoever runs its process.  Two hooks tell
its callers what became of what they sent: a ``Tracker`` (set in ``tracking`` for the
current context) hears of each message sent and confirmed, which a websocket client sees as
``accepted``; the gateway's error notices about events (``Denied``) go to ``Outcomes``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import ClassVar, Protocol

from mesh.agent import Agent
from mesh.bridge.outcomes import Outcomes
from mesh.config import Settings
from mesh.envelope import Message


class Tracker(Protocol):
    """Hears of each message the bridge sends in the current context (``tracking``)."""

    def sending(self, message: Message) -> None:
        """``message`` is about to be sent (its id is known)."""

    def confirmed(self, message: Message) -> None:
        """The broker took ``message``."""


tracking: ContextVar[Tracker | None] = ContextVar("mesh_bridge_tracking", default=None)
"""The tracker of what is sent in this context: ``Agent.request`` sends and then waits for
the reply, and a websocket client hears of the first step before the second."""


class BridgeAgent(Agent):
    """An agent that sends on behalf of the bridge's callers (``x-mesh-on-behalf-of``)."""

    control_commands: ClassVar[frozenset[str]] = frozenset({"ping"})

    def __init__(
        self,
        id: str,
        *,
        outcomes: Outcomes,
        settings: Settings | None = None,
        instance: str | None = None,
    ) -> None:
        super().__init__(id, settings=settings, instance=instance)
        self.outcomes = outcomes

    async def send(self, message: Message, routing_key: str) -> None:
        tracker = tracking.get()
        if tracker is None:
            await super().send(message, routing_key)
            return
        tracker.sending(message)
        await super().send(message, routing_key)
        tracker.confirmed(message)

    def on_error_notice(self, message: Message) -> None:
        # Only the gateway's own notices carry no verified sender (x-mesh-user).
        if message.user_id is None and self.outcomes.refused(message):
            return
        super().on_error_notice(message)
