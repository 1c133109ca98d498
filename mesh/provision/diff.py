"""What the broker and the credentials directory hold, against what the plan wants: changes.

Only this mesh's users are read as its own (``plan.managed_by``); a user of the plan's name
that is not one of them stops provisioning before anything changes.  Each change prints as
one line, which is what ``mesh provision --dry-run`` shows.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from mesh.management import ManagementAPI, PermissionInfo, TopicPermissionInfo, UserInfo
from mesh.policy.permissions import NOTHING
from mesh.provision.credentials import Credentials, CredentialStore
from mesh.provision.errors import ProvisionError
from mesh.provision.objects import MeshObjects
from mesh.provision.passwords import matches
from mesh.provision.plan import DesiredUser, Plan, managed_by
from mesh.provision.redis_users import (
    RedisUserInfo,
    describe,
    managed_redis_user,
    password_matches,
    read_redis_users,
)


@dataclass(frozen=True)
class BrokerState:
    """What the broker holds: every user; the mesh's vhost's permissions, exchanges, queues."""

    vhost_exists: bool
    users: dict[str, UserInfo]
    permissions: dict[str, PermissionInfo]
    topic_permissions: dict[str, dict[str, TopicPermissionInfo]]
    """User → exchange → its topic permissions there."""
    exchanges: frozenset[str] = frozenset()
    queues: frozenset[str] = frozenset()


async def read_state(api: ManagementAPI, vhost: str) -> BrokerState:
    users = {u.name: u for u in await api.users()}
    if vhost not in await api.vhosts():
        return BrokerState(False, users, {}, {})
    topics: dict[str, dict[str, TopicPermissionInfo]] = {}
    for topic in await api.topic_permissions(vhost):
        topics.setdefault(topic.user, {})[topic.exchange] = topic
    return BrokerState(
        True,
        users,
        {p.user: p for p in await api.permissions(vhost)},
        topics,
        frozenset(await api.exchanges(vhost)),
        frozenset(q.name for q in await api.queues(vhost)),
    )


@dataclass(frozen=True)
class RedisState:
    """The Redis users named like the mesh's, and what Redis makes of the rules each wanted
    user is to have (to compare like with like)."""

    users: dict[str, RedisUserInfo]
    wanted: dict[str, str]


async def read_redis_state(redis: aioredis.Redis, plan: Plan) -> RedisState:
    users = await read_redis_users(redis, plan.namespace)
    probe = f"mesh-probe-{secrets.token_hex(8)}"
    wanted = {u.name: await describe(redis, u.redis, probe) for u in plan.users}
    return RedisState(users, wanted)


@dataclass(frozen=True)
class CreateVhost:
    vhost: str

    def __str__(self) -> str:
        return f"create vhost {self.vhost}"


@dataclass(frozen=True)
class DeclareObjects:
    """Import the mesh's exchanges and queues that are missing, and their bindings."""

    vhost: str
    objects: MeshObjects

    def __str__(self) -> str:
        return f"declare {', '.join(self.objects.names())} on vhost {self.vhost}"


@dataclass(frozen=True)
class WriteCredentials:
    """Write a principal's env file: with a new password, or the kept one in a new URL."""

    principal: str
    user: str
    path: Path
    new_password: bool

    def __str__(self) -> str:
        why = "a new password" if self.new_password else "its password kept, the URL changed"
        return f"write credentials {self.path} ({why})"


@dataclass(frozen=True)
class PutUser:
    """Create a user, or set its password and tags (RabbitMQ sets both at once)."""

    user: DesiredUser
    why: str
    """``create``, or what differs."""

    def __str__(self) -> str:
        p = self.user.principal
        if self.why == "create":
            return (
                f"create user {self.user.name} (principal {p.name}, {p.kind}, agents "
                f"{', '.join(p.agents)}; tags {','.join(self.user.tags)})"
            )
        return f"update user {self.user.name}: {self.why}"


@dataclass(frozen=True)
class SetPermissions:
    user: str
    vhost: str
    configure: str
    write: str
    read: str

    def __str__(self) -> str:
        return (
            f"set permissions of {self.user} on vhost {self.vhost}: configure {self.configure} "
            f"write {self.write} read {self.read}"
        )


@dataclass(frozen=True)
class SetTopicPermission:
    user: str
    vhost: str
    exchange: str
    write: str
    read: str

    def __str__(self) -> str:
        return (
            f"set topic permissions of {self.user} on {self.exchange}: write {self.write} "
            f"read {self.read}"
        )


@dataclass(frozen=True)
class DeleteUser:
    user: str

    def __str__(self) -> str:
        return f"delete user {self.user} (no principal of the policy is it any more)"


@dataclass(frozen=True)
class PutRedisUser:
    """Create or reset a Redis user: its password and every rule at once."""

    user: DesiredUser
    why: str

    def __str__(self) -> str:
        if self.why == "create":
            return f"create redis user {self.user.name} (principal {self.user.principal.name})"
        return f"update redis user {self.user.name}: {self.why}"


@dataclass(frozen=True)
class DeleteRedisUser:
    user: str

    def __str__(self) -> str:
        return f"delete redis user {self.user} (no principal of the policy is it any more)"


@dataclass(frozen=True)
class RemoveCredentials:
    principal: str
    path: Path

    def __str__(self) -> str:
        return f"remove credentials {self.path} (principal {self.principal} has no user now)"


Change = (
    CreateVhost
    | DeclareObjects
    | WriteCredentials
    | PutUser
    | SetPermissions
    | SetTopicPermission
    | DeleteUser
    | PutRedisUser
    | DeleteRedisUser
    | RemoveCredentials
)


def diff(
    plan: Plan,
    store: CredentialStore,
    amqp_url: str,
    state: BrokerState | None,
    *,
    redis_state: RedisState | None = None,
    redis_url: str | None = None,
) -> list[Change]:
    """The changes that make ``store``, the broker (``state``) and Redis (``redis_state``)
    what ``plan`` wants, in the order to make them; a ``None`` state is left alone.

    ``amqp_url`` and ``redis_url`` are the URLs provisioning runs with: the credentials'
    URLs point where they do.  Raises ``ProvisionError`` when a user the plan wants exists
    but is not this mesh's, or a credentials file is another mesh's.
    """
    passwords = _passwords(plan, store)
    changes: list[Change] = []
    for user in plan.users:
        principal = user.principal.name
        password = passwords[principal]
        if password is None:
            changes.append(WriteCredentials(principal, user.name, store.path(principal), True))
            continue
        wanted = Credentials(principal, user.name, password, amqp_url, plan.namespace, redis_url)
        if store.text(principal) != wanted.env():
            changes.append(WriteCredentials(principal, user.name, store.path(principal), False))
    if state is not None:
        changes += _broker_changes(plan, state, passwords)
    if redis_state is not None:
        changes += _redis_changes(plan, redis_state, passwords)
    wanted_principals = {u.principal.name for u in plan.users}
    changes += [
        RemoveCredentials(principal, store.path(principal))
        for principal in store.principals()
        if principal not in wanted_principals
    ]
    return changes


def _passwords(plan: Plan, store: CredentialStore) -> dict[str, str | None]:
    """Each principal's kept password (``None``: none yet); every file must be this mesh's."""
    passwords: dict[str, str | None] = {}
    for principal in {*store.principals(), *(u.principal.name for u in plan.users)}:
        kept = store.read(principal)
        if kept is not None and kept[1] != plan.namespace:
            raise ProvisionError(
                f"{store.path(principal)} holds credentials of mesh namespace {kept[1]!r}, "
                f"not {plan.namespace!r}: give each mesh a credentials directory of its own "
                "(--credentials)"
            )
        passwords[principal] = None if kept is None else kept[0]
    return passwords


def _broker_changes(
    plan: Plan, state: BrokerState, passwords: dict[str, str | None]
) -> list[Change]:
    users: list[Change] = [] if state.vhost_exists else [CreateVhost(plan.vhost)]
    missing = None if plan.objects is None else plan.objects.missing(state.exchanges, state.queues)
    if missing is not None:
        users.append(DeclareObjects(plan.vhost, missing))
    permissions: list[Change] = []
    for user in plan.users:
        existing = state.users.get(user.name)
        if existing is not None and not managed_by(plan.namespace, existing.name, existing.tags):
            raise ProvisionError(
                f"broker user {user.name} exists and is not one mesh namespace "
                f"{plan.namespace!r} provisioned (tags: {','.join(existing.tags) or 'none'}): "
                "provisioning leaves it alone; delete or rename it, or use another "
                "MESH_NAMESPACE"
            )
        why = _user_differs(user, existing, passwords[user.principal.name])
        if why:
            users.append(PutUser(user, why))
        permissions += _permission_changes(plan.vhost, user, state)
    wanted = {u.name for u in plan.users}
    deleted: list[Change] = [
        DeleteUser(name)
        for name, info in sorted(state.users.items())
        if managed_by(plan.namespace, name, info.tags) and name not in wanted
    ]
    return users + permissions + deleted


def _user_differs(user: DesiredUser, existing: UserInfo | None, password: str | None) -> str:
    """Why the user must be put: ``create``, what differs, or ``""`` for nothing."""
    if existing is None:
        return "create"
    why = []
    if set(existing.tags) != set(user.tags):
        why.append(f"tags {','.join(existing.tags) or 'none'} -> {','.join(user.tags)}")
    if password is None:
        why.append("a new password (it had no credentials file)")
    elif not matches(password, existing.password_hash, existing.hashing_algorithm):
        why.append("the password of its credentials file (the broker held another)")
    return "; ".join(why)


def _permission_changes(vhost: str, user: DesiredUser, state: BrokerState) -> list[Change]:
    p = user.permissions
    changes: list[Change] = []
    if state.permissions.get(user.name) != PermissionInfo(user.name, p.configure, p.write, p.read):
        changes.append(SetPermissions(user.name, vhost, p.configure, p.write, p.read))
    held = state.topic_permissions.get(user.name, {})
    for topic in p.topics:
        if held.get(topic.exchange) != TopicPermissionInfo(
            user.name, topic.exchange, topic.write, topic.read
        ):
            changes.append(
                SetTopicPermission(user.name, vhost, topic.exchange, topic.write, topic.read)
            )
    # On an exchange the plan does not name: nothing.  Not cleared: RabbitMQ 3.10's HTTP
    # API clears all of a user's topic permissions on a vhost at once, and an exchange
    # without any admits every key until they are set again.
    named = {t.exchange for t in p.topics}
    for exchange, other in sorted(held.items()):
        if exchange not in named and (other.write, other.read) != (NOTHING, NOTHING):
            changes.append(SetTopicPermission(user.name, vhost, exchange, NOTHING, NOTHING))
    return changes


def _redis_changes(
    plan: Plan, state: RedisState, passwords: dict[str, str | None]
) -> list[Change]:
    changes: list[Change] = []
    for user in plan.users:
        existing = state.users.get(user.name)
        if existing is not None and not managed_redis_user(plan.namespace, existing):
            raise ProvisionError(
                f"redis user {user.name} exists and is not one mesh namespace "
                f"{plan.namespace!r} provisioned: provisioning leaves it alone; delete or "
                "rename it, or use another MESH_NAMESPACE"
            )
        password = passwords[user.principal.name]
        if existing is None:
            why = "create"
        elif password is None or not password_matches(existing, password):
            why = "the password of its credentials file"
        elif existing.rules != state.wanted[user.name]:
            why = "its keys or commands"
        else:
            continue
        changes.append(PutRedisUser(user, why))
    wanted = {u.name for u in plan.users}
    changes += [
        DeleteRedisUser(name)
        for name, info in sorted(state.users.items())
        if managed_redis_user(plan.namespace, info) and name not in wanted
    ]
    return changes
