"""The gateway agent: replicas compete on ``mesh.gateway`` and relay to ``mesh.topic``."""

from __future__ import annotations

from typing import Any

from mesh.agent import GATEWAY_CAPABILITY, Agent
from mesh.deadcounts import DeadLetterCounts
from mesh.gateway.audit import Audit
from mesh.gateway.authenticate import Authenticate
from mesh.gateway.decode import Decode
from mesh.gateway.filer import DeadLetterFiler
from mesh.gateway.guard import Guard
from mesh.gateway.pipeline import Pipeline, Stage
from mesh.gateway.relay import InternalRelay, Relay
from mesh.gateway.replies import BindReplies


def default_stages(gateway: str = "gateway", *, replies: BindReplies | None = None) -> list[Stage]:
    """The gateway's stages; ``replies`` (a ``BindReplies`` on the mesh's Redis) binds
    replies to requests, and a gateway without it relays any reply."""
    bind: list[Stage] = [] if replies is None else [replies]
    return [Decode(), Guard(gateway), Authenticate(), *bind, Audit()]


class Gateway(Agent):
    """Run with ``mesh gateway``; start as many replicas as the load needs."""

    capabilities = [GATEWAY_CAPABILITY]
    behaviours = [Relay, InternalRelay, DeadLetterFiler]
    control_commands = frozenset({"ping"})
    broadcast_control = False

    def __init__(
        self, id: str = "gateway", *, stages: list[Stage] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(id, **kwargs)
        if stages is None:
            stages = default_stages(
                self.id, replies=BindReplies(self.redis, self.settings.namespace)
            )
        pipeline = Pipeline(stages)
        for name in (Relay.name, InternalRelay.name):
            relay = self.behaviour_map[name]
            assert isinstance(relay, Relay)
            relay.pipeline = pipeline
        filer = self.behaviour_map[DeadLetterFiler.name]
        assert isinstance(filer, DeadLetterFiler)
        filer.counts = DeadLetterCounts(self.redis, self.settings.namespace)
