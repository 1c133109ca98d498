"""The users a policy wants on the broker: one per principal that connects, with its permissions.

Broker users are server-wide, so each name carries the mesh's namespace
(``<namespace>.<principal>``) and two tags mark it as provisioned by that mesh
(``mesh-managed``, ``mesh-namespace:<namespace>``): provisioning touches only users bearing
both and the name prefix, never another mesh's or an administrator's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from mesh.policy import Policy, Principal, globs
from mesh.policy.model import EVERYONE
from mesh.policy.permissions import (
    UserPermissions,
    gateway_permissions,
    operator_permissions,
    shared_agent_permissions,
)
from mesh.policy.topics import SELF, expand
from mesh.policy.users import broker_user
from mesh.provision.errors import ProvisionError
from mesh.provision.objects import MeshObjects
from mesh.provision.redis_users import RedisUser, redis_notes, redis_user
from mesh.topology import TopicError

MANAGED_TAG = "mesh-managed"
"""On every user some mesh's provisioning made (an administrator can list them all)."""
NAMESPACE_TAG = "mesh-namespace:"
"""Followed by the namespace of the mesh whose provisioning made the user."""


def managed_tags(namespace: str) -> tuple[str, str]:
    return MANAGED_TAG, f"{NAMESPACE_TAG}{namespace}"


def managed_by(namespace: str, user: str, tags: Collection[str]) -> bool:
    """Whether broker user ``user`` with ``tags`` is one the mesh ``namespace`` provisioned.

    Both tags and the name prefix: a user someone tagged by hand under another name, or
    named like ours without the tags, is not ours to change.
    """
    return set(managed_tags(namespace)) <= set(tags) and user.startswith(f"{namespace}.")


@dataclass(frozen=True)
class DesiredUser:
    """A broker user the policy wants, and all it may do on the mesh's vhost."""

    principal: Principal
    name: str
    tags: tuple[str, ...]
    permissions: UserPermissions
    redis: RedisUser
    """Its Redis user, of the same name."""


@dataclass(frozen=True)
class Plan:
    """Every user a policy wants for one mesh (namespace) on one vhost."""

    namespace: str
    vhost: str
    users: tuple[DesiredUser, ...]
    objects: MeshObjects | None = None
    """The mesh's exchanges and queues to declare where missing (``None``: leave them)."""
    notes: tuple[str, ...] = ()
    """What is provisioned, but perhaps not as the policy's author meant."""


def build_plan(
    policy: Policy, namespace: str, vhost: str, *, objects: MeshObjects | None = None
) -> Plan:
    """The users ``policy`` wants for the mesh ``namespace`` on ``vhost``, and ``objects``.

    Agents (and the bridge) get ``shared_agent_permissions`` over the ids and globs their
    principal names, with the subscriptions its enforced rules allow (a delegating
    principal also those of the users it acts for, and read on ``mesh.dead`` for
    ``GET /dead``); the gateway ``gateway_permissions``;
    operators ``operator_permissions``.  Users (token principals) get none: they act
    through the bridge.  Raises ``ProvisionError`` for a gateway that is not one agent id,
    and for an agent id no agent can have.
    """
    notes: list[str] = []
    users = []
    for principal in policy.principals():
        try:
            permissions = _permissions(policy, principal, notes)
        except TopicError as exc:  # an agent id no agent can have, say
            raise ProvisionError(f"principal {principal.name!r}: {exc}") from None
        if permissions is not None:
            tags = (*managed_tags(namespace), *permissions.tags)
            name = broker_user(namespace, principal.name)
            excluded = sorted(_listed_elsewhere(policy, principal))
            if principal.kind not in ("gateway", "operator"):
                notes += redis_notes(principal, excluded)
            redis = redis_user(namespace, principal)
            users.append(DesiredUser(principal, name, tags, permissions, redis))
    return Plan(namespace, vhost, tuple(users), objects, tuple(notes))


def _permissions(policy: Policy, principal: Principal, notes: list[str]) -> UserPermissions | None:
    if principal.kind == "user":
        return None
    if principal.kind == "gateway":
        return gateway_permissions(_one_id(principal))
    patterns = subscribe_patterns(policy, principal)
    if principal.kind == "operator":
        # A command's client id is random: {self} names nothing an operator can bind.
        dropped = [p for p in patterns if SELF in p]
        if dropped:
            notes.append(
                f"principal {principal.name!r}: {', '.join(dropped)} not provisioned: an "
                f"operator's {SELF} is a mesh command's random client id"
            )
        return operator_permissions(tail=[p for p in patterns if SELF not in p])
    if principal.delegates:
        for user in policy.principals():
            if user.kind == "user":
                patterns += [expand(p, user.name) for p in subscribe_patterns(policy, user)]
    shared = len(principal.agents) > 1 or any(globs.is_glob(a) for a in principal.agents)
    if shared and any(SELF in p for p in patterns):
        notes.append(
            f"principal {principal.name!r}: its agents ({', '.join(principal.agents)}) share "
            f"one broker user, which may bind {SELF} for any of them (bindings are checked by "
            "the broker alone); give an agent a principal of its own where that matters"
        )
    return shared_agent_permissions(
        principal.agents,
        list(dict.fromkeys(patterns)),
        excluding=_listed_elsewhere(policy, principal),
        read_dead=principal.delegates,
    )


def subscribe_patterns(policy: Policy, principal: Principal) -> list[str]:
    """The binding patterns enforced rules allow ``principal`` on ``mesh.topic``, ``{self}``
    unexpanded (``Policy.enforced_subscriptions`` expands it for one agent id)."""
    names = {EVERYONE, principal.name, *principal.roles}
    patterns = [
        pattern
        for rule in policy.rules
        if rule.action == "subscribe"
        and rule.effect == "allow"
        and rule.mode == "enforce"
        and names.intersection(rule.who)
        for pattern in rule.topics
    ]
    return list(dict.fromkeys(patterns))


def _one_id(principal: Principal) -> str:
    agents: Sequence[str] = principal.agents
    if len(agents) != 1 or globs.is_glob(agents[0]):
        raise ProvisionError(
            f"principal {principal.name!r} (gateway) must name one agent id, the gateway's "
            f"(its replicas share it), not {', '.join(agents)}"
        )
    return agents[0]


def _listed_elsewhere(policy: Policy, principal: Principal) -> set[str]:
    """Agent ids other principals list that ``principal``'s globs match: the policy gives
    each to the principal listing it, and so must the broker."""
    own_globs = [a for a in principal.agents if globs.is_glob(a)]
    return {
        agent
        for other in policy.principals()
        if other is not principal
        for agent in other.agents
        if not globs.is_glob(agent) and any(globs.matches(g, agent) for g in own_globs)
    }
