"""Redis ACL users: one per principal that connects, allowed only the keys that are its own.

An agent's user may read and write its own state (``<ns>:state:<agent>[:…]``), the ids its
behaviours handled (``<ns>:handled:<agent>:…``), its queues' binding records
(``<ns>:bindings:mesh.q.<agent>.…``, ``mesh.i.<agent>.…``) and its own registry entry (its
instances' records and its set of instances), and read the rest of the registry; nothing of
another agent.  A delegating principal's (the bridge's) may also read the audit trail and
the redrive marks, and keep its A2A tasks (``<ns>:a2a:*``).  The registry's shared indexes
are the gateway's to write (``mesh/registry.py``).  The gateway's and the operators' users
may use every key of the mesh.  No user may run administrative or keyspace-wide commands
(``@admin``, ``@dangerous``: ``KEYS``, ``FLUSHALL``, ``CONFIG`` …), nor publish or subscribe.

Redis users are server-wide, so each name carries the mesh's namespace (the broker user's
name, ``<namespace>.<principal>``), and Redis having no tags, a channel permission nothing
uses marks a user as provisioned by that mesh (``&mesh-managed:<namespace>``): provisioning
touches only users with both.  The password is the principal's broker password (one
identity, one secret in its credentials file); Redis gets only its SHA-256 (``#<hex>``),
so it is never sent in clear.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from mesh.policy import Principal
from mesh.policy.users import broker_user

MARK = "mesh-managed:"
"""Followed by the namespace: the channel pattern that marks a user as a mesh's own."""

COMMANDS = (
    "+@all",
    "-@admin",
    "-@dangerous",
    "-@pubsub",
    "-scan",
    "-randomkey",
    "-function",
    "-script|flush",
    "-script|kill",
)
"""What every mesh user may run: data commands, transactions and scripts (which Redis checks
command by command against the user's keys); the gateway and operators may also SCAN."""


@dataclass(frozen=True)
class RedisUser:
    """A Redis user the policy wants: its name, principal and ACL rules (no password)."""

    name: str
    principal: str
    rules: tuple[str, ...]

    def setuser(self, password: str) -> list[str]:
        """The ``ACL SETUSER`` arguments that make this user, from nothing, with ``password``."""
        digest = hashlib.sha256(password.encode()).hexdigest()
        return [self.name, "reset", "on", f"#{digest}", *self.rules]


@dataclass(frozen=True)
class RedisUserInfo:
    """A user as Redis holds it."""

    name: str
    rules: str
    """Its ``ACL LIST`` line after the name, password hashes left out."""
    password_hashes: tuple[str, ...]
    channels: str


def redis_user(namespace: str, principal: Principal) -> RedisUser:
    """The Redis user of ``principal`` in the mesh ``namespace``."""
    keys: list[str]
    commands: tuple[str, ...] = COMMANDS
    if principal.kind in ("gateway", "operator"):
        keys = [f"~{namespace}:*"]
        # Verifying the audit trail lists its streams with SCAN (a chain missing from the
        # trail's own set must still be found); SCAN shows key names only.
        commands = tuple(c for c in COMMANDS if c != "-scan")
    else:
        keys = [f"%R~{namespace}:registry:*"]
        for agent in principal.agents:
            own = _key_glob(agent)
            keys += [
                f"~{namespace}:state:{own}",
                f"~{namespace}:state:{own}:*",
                f"~{namespace}:handled:{own}:*",
                f"~{namespace}:bindings:mesh.q.{own}.*",
                f"~{namespace}:bindings:mesh.i.{own}.*",
                f"~{namespace}:registry:inst:{own}:*",
                f"~{namespace}:registry:agent:{own}",
            ]
        if principal.delegates:
            # The bridge shows its callers the audit records they may see (GET /audit) and
            # which dead letters were redriven (GET /dead), and keeps the A2A tasks it runs
            # for them (mesh/bridge/a2a/tasks.py).
            keys += [
                f"%R~{namespace}:audit:*",
                f"%R~{namespace}:dead:redriven",
                f"~{namespace}:a2a:*",
            ]
    rules = ("resetkeys", *keys, "resetchannels", f"&{MARK}{namespace}", *commands)
    return RedisUser(broker_user(namespace, principal.name), principal.name, rules)


def redis_notes(principal: Principal, excluded: Sequence[str]) -> list[str]:
    """What the Redis user of ``principal`` may reach beyond its own agents' keys.

    ``excluded`` are agent ids other principals list that its globs match: Redis key
    patterns cannot leave them out.
    """
    notes = []
    if excluded:
        notes.append(
            f"principal {principal.name!r}: its Redis user may also reach the state and "
            f"registry entries of {', '.join(sorted(excluded))} (listed by other principals; "
            "Redis key patterns cannot leave them out of its globs)"
        )
    loose = [a for a in principal.agents if _widens(a)]
    if loose:
        notes.append(
            f"principal {principal.name!r}: in Redis key patterns '*' also matches ':' and '.', "
            f"so {', '.join(loose)} may reach keys of agents the glob does not match; end a "
            "glob with its only '*' to keep it exact"
        )
    return notes


def _key_glob(agent: str) -> str:
    """An agent id or policy glob as a Redis key glob (``[!…]`` is ``[^…]`` there)."""
    return agent.replace("[!", "[^")


def _widens(glob: str) -> bool:
    """Whether the Redis pattern of ``glob`` matches more than the agents it names: a ``*``
    followed by anything can run across the ':' and '.' that separate words of a key."""
    star = glob.find("*")
    return star != -1 and star != len(glob) - 1


async def read_redis_users(redis: aioredis.Redis, namespace: str) -> dict[str, RedisUserInfo]:
    """The Redis users named like this mesh's (``<namespace>.…``), as Redis holds them."""
    users = {}
    for raw in await redis.acl_users():
        name = _text(raw)
        if not name.startswith(f"{namespace}."):
            continue
        info = await redis.acl_getuser(name)
        if info is None:  # deleted meanwhile
            continue
        users[name] = _info(name, info)
    return users


def managed_redis_user(namespace: str, info: RedisUserInfo) -> bool:
    """Whether this mesh's provisioning made the user: its name and its mark."""
    return info.name.startswith(f"{namespace}.") and f"&{MARK}{namespace}" in info.channels.split()


def _info(name: str, info: dict[str, Any]) -> RedisUserInfo:
    # redis-py parses ACL GETUSER into lists; joined, they compare as Redis normalised them.
    parts = [_text(info.get(field, "")) for field in ("flags", "keys", "channels")]
    parts += [_text(info.get(field, "")) for field in ("categories", "commands", "selectors")]
    hashes = tuple(_text(p) for p in info.get("passwords", []))
    return RedisUserInfo(name, " | ".join(parts), hashes, parts[2])


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    return str(value)


async def describe(redis: aioredis.Redis, user: RedisUser, probe: str) -> str:
    """What Redis makes of ``user``'s rules, as ``read_redis_users`` shows a user: set on a
    scratch user named ``probe`` (disabled, no password) and deleted again."""
    await set_user(redis, probe, "reset", "off", *user.rules)
    try:
        info = await redis.acl_getuser(probe)
    finally:
        await redis.acl_deluser(probe)
    assert info is not None
    return _info(probe, info).rules.replace("off", "on", 1)


def password_matches(info: RedisUserInfo, password: str) -> bool:
    return hashlib.sha256(password.encode()).hexdigest() in info.password_hashes


async def set_user(redis: aioredis.Redis, *rules: str) -> None:
    """``ACL SETUSER`` with ``rules`` as written (redis-py's ``acl_setuser`` takes them apart
    into keyword arguments, which would be a second spelling of each rule)."""
    await redis.execute_command("ACL", "SETUSER", *rules)  # type: ignore[no-untyped-call]
