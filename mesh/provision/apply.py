"""Making the changes: the credentials directory first, then the broker and Redis, one change
at a time.

Every change sets a whole value (a user with its password and tags, a permission), so
running the same plan twice, or again after a failure half-way, ends in the same state;
a new password is written to its file before the broker gets it, so it is never lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import assert_never

import redis.asyncio as aioredis

from mesh.management import ManagementAPI
from mesh.provision.credentials import Credentials, CredentialStore
from mesh.provision.diff import (
    Change,
    CreateVhost,
    DeclareObjects,
    DeleteRedisUser,
    DeleteUser,
    PutRedisUser,
    PutUser,
    RemoveCredentials,
    SetPermissions,
    SetTopicPermission,
    WriteCredentials,
    diff,
    read_redis_state,
    read_state,
)
from mesh.provision.errors import ProvisionError
from mesh.provision.passwords import new_password
from mesh.provision.plan import Plan
from mesh.provision.redis_users import set_user


async def provision(
    plan: Plan,
    store: CredentialStore,
    amqp_url: str,
    api: ManagementAPI | None,
    *,
    redis: aioredis.Redis | None = None,
    redis_url: str | None = None,
    dry_run: bool = False,
    on_change: Callable[[Change], None] = lambda change: None,
) -> list[Change]:
    """Make the broker behind ``api``, Redis behind ``redis`` (at ``redis_url``) and
    ``store`` what ``plan`` wants; the changes made.

    ``api`` and ``redis`` must be an administrator's; ``None`` leaves that server alone
    (credentials only, say for a definitions file).  ``dry_run`` only works the changes
    out.  ``on_change`` hears of each change once it is made (with ``dry_run``, at once).
    """
    state = None if api is None else await read_state(api, plan.vhost)
    redis_state = None if redis is None else await read_redis_state(redis, plan)
    changes = diff(plan, store, amqp_url, state, redis_state=redis_state, redis_url=redis_url)
    for change in changes:
        if not dry_run:
            await apply(change, plan, store, amqp_url, api, redis=redis, redis_url=redis_url)
        on_change(change)
    return changes


async def apply(
    change: Change,
    plan: Plan,
    store: CredentialStore,
    amqp_url: str,
    api: ManagementAPI | None,
    *,
    redis: aioredis.Redis | None = None,
    redis_url: str | None = None,
) -> None:
    """Make one change."""
    match change:
        case WriteCredentials():
            kept = store.read(change.principal)
            password = new_password() if change.new_password or kept is None else kept[0]
            store.save(
                Credentials(
                    change.principal, change.user, password, amqp_url, plan.namespace, redis_url
                )
            )
        case RemoveCredentials():
            store.remove(change.principal)
        case PutRedisUser() | DeleteRedisUser():
            if redis is None:
                raise ProvisionError(f"{change}: needs Redis")
            await _apply_redis(change, store, redis)
        case _:
            if api is None:
                raise ProvisionError(f"{change}: needs the broker")
            await _apply_broker(change, store, api)


async def _apply_redis(
    change: PutRedisUser | DeleteRedisUser, store: CredentialStore, redis: aioredis.Redis
) -> None:
    if isinstance(change, DeleteRedisUser):
        await redis.acl_deluser(change.user)
        return
    kept = store.read(change.user.principal.name)
    if kept is None:  # diff writes credentials before the user they are for
        raise ProvisionError(f"{change}: no credentials to set")
    await set_user(redis, *change.user.redis.setuser(kept[0]))


async def _apply_broker(
    change: CreateVhost | DeclareObjects | PutUser | SetPermissions | SetTopicPermission
    | DeleteUser,
    store: CredentialStore,
    api: ManagementAPI,
) -> None:
    match change:
        case CreateVhost():
            await api.create_vhost(change.vhost)
        case DeclareObjects():
            await api.import_definitions(change.objects.definitions(), change.vhost)
        case PutUser():
            kept = store.read(change.user.principal.name)
            if kept is None:  # diff writes credentials before the user they are for
                raise ProvisionError(f"{change}: no credentials to set")
            await api.put_user(change.user.name, kept[0], change.user.tags)
        case SetPermissions():
            await api.set_permissions(
                change.vhost, change.user, change.configure, change.write, change.read
            )
        case SetTopicPermission():
            await api.set_topic_permissions(
                change.vhost, change.user, change.exchange, change.write, change.read
            )
        case DeleteUser():
            await api.delete_user(change.user)
        case _:
            assert_never(change)
