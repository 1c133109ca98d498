"""Running a whole mesh from one spec file (``mesh.yaml``): the spec (``spec``), the
processes it runs, each as its policy principal (``processes``), their supervisor
(``supervisor``) and the run directory that ``mesh up --detach``, ``mesh status``,
``mesh logs`` and ``mesh down`` share (``rundir``)."""

from mesh.deploy.errors import SpecError
from mesh.deploy.spec import (
    AgentSpec,
    BridgeSpec,
    GatewaySpec,
    MeshSpec,
    ProcessSpec,
    ResourcesSpec,
    RestartSpec,
    load_spec,
)

__all__ = [
    "AgentSpec",
    "BridgeSpec",
    "GatewaySpec",
    "MeshSpec",
    "ProcessSpec",
    "ResourcesSpec",
    "RestartSpec",
    "SpecError",
    "load_spec",
]
