"""Running a whole mesh from one spec file, ``mesh.yaml``: the spec (``spec``, its problems
in ``errors``), the processes it runs, each as its policy principal (``processes``), how one is
started on this machine (``launch``), their supervisor (``supervisor``), and the run directory
that ``mesh status``, ``mesh logs`` and ``mesh down`` read (``rundir``)."""

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
