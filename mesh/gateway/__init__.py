"""The gateway: every message passes it, on the user lane (``mesh.policy`` to ``mesh.topic``)
or the mesh's own (``mesh.policy.internal`` to ``mesh.internal``)."""

from mesh.gateway.agent import Gateway, default_stages
from mesh.gateway.pipeline import Denied, Passage, Pipeline, Stage

__all__ = ["Denied", "Gateway", "Passage", "Pipeline", "Stage", "default_stages"]
