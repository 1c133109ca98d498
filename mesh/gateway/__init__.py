"""The gateway: every message passes it on its way from ``mesh.policy`` to ``mesh.topic``."""

from mesh.gateway.agent import Gateway, default_stages
from mesh.gateway.pipeline import Denied, Passage, Pipeline, Stage

__all__ = ["Denied", "Gateway", "Passage", "Pipeline", "Stage", "default_stages"]
