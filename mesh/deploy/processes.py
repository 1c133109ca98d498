"""The processes a mesh spec runs, each as the policy principal of its agent id: what
``mesh up`` starts, and what each Kubernetes Deployment of a spec runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mesh.config import Settings
from mesh.deploy.spec import MeshSpec, ProcessSpec
from mesh.policy import Kind, Policy
from mesh.yamlfile import Location

Role = Literal["gateway", "agent", "bridge"]

STOP_GRACE = 10.0
"""Seconds a process gets beyond its ``shutdown_timeout`` to leave the registry, close its
connections and exit once its handlers finished."""

_DRAIN: float = Settings.model_fields["shutdown_timeout"].default


@dataclass(frozen=True)
class Process:
    """One process of the mesh: a gateway replica, an agent replica, or the bridge."""

    name: str
    """Unique in the mesh: the agent id, ``<id>-<n>`` for each of several replicas."""
    role: Role
    agent: str
    """The agent id it runs as (replicas share it)."""
    principal: str
    """The policy principal of ``agent``: its broker and Redis user."""
    args: tuple[str, ...]
    """The ``mesh`` command's arguments: ``("run", "module:Class", "--id", "v7", …)``."""
    env: dict[str, str] = field(default_factory=dict)
    """What the spec sets: its settings as ``MESH_*`` variables, and its ``env``."""
    stop_timeout: float = _DRAIN + STOP_GRACE
    """How long it may take to drain and exit after SIGTERM."""


def plan(spec: MeshSpec, policy: Policy) -> list[Process]:
    """The processes of ``spec``: the gateway's replicas first, then each agent's, then the
    bridge.  Raises ``SpecError`` (at the id's line) for an id that is no principal's in
    ``policy`` or one of another kind than the process needs."""
    out: list[Process] = []
    gateway = spec.gateway
    principal = _principal(spec, policy, gateway.id, "gateway", ("gateway", "id"))
    args: tuple[str, ...] = ("gateway", "--id", gateway.id)
    out += _replicas(
        spec, gateway, role="gateway", agent=gateway.id, principal=principal, args=args,
        count=gateway.replicas,
    )
    for i, agent in enumerate(spec.agents):
        principal = _principal(spec, policy, agent.id, "agent", ("agents", i, "id"))
        args = ("run", agent.class_, "--id", agent.id)
        out += _replicas(
            spec, agent, role="agent", agent=agent.id, principal=principal, args=args,
            count=agent.replicas,
        )
    bridge = spec.bridge
    if bridge is not None and bridge.enabled:
        principal = _principal(spec, policy, bridge.id, "bridge", ("bridge", "id"))
        args = ("bridge", "--id", bridge.id, "--host", bridge.host, "--port", str(bridge.port))
        out += _replicas(
            spec, bridge, role="bridge", agent=bridge.id, principal=principal, args=args, count=1
        )
        if bridge.token_for is not None:
            _check_token_user(spec, policy, bridge.token_for)
    _check_names(spec, out)
    return out


def _check_names(spec: MeshSpec, processes: list[Process]) -> None:
    # Replicas are named <id>-<n>, which another agent's id may be.
    seen: set[str] = set()
    for process in processes:
        if process.name in seen:
            path: Location = (process.role, "id")
            if process.role == "agent":
                index = next(i for i, a in enumerate(spec.agents) if a.id == process.agent)
                path = ("agents", index, "id")
            raise spec.error(
                path,
                f"process name {process.name!r} is taken (replicas are named <id>-<n>)",
            )
        seen.add(process.name)


def _principal(spec: MeshSpec, policy: Policy, agent: str, kind: Kind, path: Location) -> str:
    principal = policy.principal_for_agent(agent)
    if principal is None:
        raise spec.error(
            path,
            f"agent id {agent!r} belongs to no principal in {spec.policy}: list it (or a glob "
            f"matching it) under a principal of kind {kind}",
        )
    if principal.kind != kind:
        raise spec.error(
            path,
            f"agent id {agent!r} belongs to principal {principal.name!r} in {spec.policy}, of "
            f"kind {principal.kind}; a {kind} process needs a principal of kind {kind}",
        )
    return principal.name


def _check_token_user(spec: MeshSpec, policy: Policy, name: str) -> None:
    principal = policy.principal(name)
    if principal is None or principal.kind != "user":
        users = sorted(p.name for p in policy.principals() if p.kind == "user")
        what = "no principal" if principal is None else f"a principal of kind {principal.kind}"
        raise spec.error(
            ("bridge", "token_for"),
            f"token_for {name!r} is {what} in {spec.policy}; it takes a principal of kind "
            f"user (users: {', '.join(users) or 'none'})",
        )


def _replicas(
    spec: MeshSpec,
    process: ProcessSpec,
    *,
    role: Role,
    agent: str,
    principal: str,
    args: tuple[str, ...],
    count: int,
) -> list[Process]:
    log_level = process.log_level or spec.log_level
    env = {**process.setting_variables(), **process.env}
    stop_timeout = float(process.settings.get("shutdown_timeout", _DRAIN)) + STOP_GRACE
    return [
        Process(
            name=agent if count == 1 else f"{agent}-{n}",
            role=role,
            agent=agent,
            principal=principal,
            args=(*args, "--log-level", log_level),
            env=env,
            stop_timeout=stop_timeout,
        )
        for n in range(1, count + 1)
    ]
