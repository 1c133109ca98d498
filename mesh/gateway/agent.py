"""The gateway agent: replicas compete on ``mesh.gateway`` and relay to ``mesh.topic``."""

from __future__ import annotations

from typing import Any

from mesh.agent import Agent
from mesh.gateway.audit import Audit
from mesh.gateway.authenticate import Authenticate
from mesh.gateway.decode import Decode
from mesh.gateway.pipeline import Pipeline, Stage
from mesh.gateway.relay import Relay


def default_stages() -> list[Stage]:
    return [Decode(), Authenticate(), Audit()]


class Gateway(Agent):
    """Run with ``mesh gateway``; start as many replicas as the load needs."""

    capabilities = ["gateway"]
    behaviours = [Relay]

    def __init__(
        self, id: str = "gateway", *, stages: list[Stage] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(id, **kwargs)
        relay = self.behaviour_map[Relay.name]
        assert isinstance(relay, Relay)
        relay.pipeline = Pipeline(default_stages() if stages is None else stages)
