"""A RabbitMQ definitions file of the plan: what a broker imports at boot
(``load_definitions`` in ``rabbitmq.conf``) or through ``POST /api/definitions``.

It holds the vhost, the plan's users (password hashes of their kept passwords), their
permissions and topic permissions, and the mesh's own exchanges, queues and bindings
(``objects``), so that agents, which may only declare exchanges passively, find them there.
"""

from __future__ import annotations

import json
from typing import Any

from mesh.provision.credentials import CredentialStore
from mesh.provision.errors import ProvisionError
from mesh.provision.passwords import SHA256, password_hash, stable_salt
from mesh.provision.plan import Plan


def definitions(plan: Plan, store: CredentialStore) -> dict[str, Any]:
    """The definitions of ``plan`` with the passwords kept in ``store``.

    Raises ``ProvisionError`` when a user has no credentials yet (provision first).
    """
    vhost = plan.vhost
    users, permissions, topic_permissions = [], [], []
    for user in plan.users:
        kept = store.read(user.principal.name)
        if kept is None:
            raise ProvisionError(
                f"no credentials for principal {user.principal.name!r} in {store.directory}: "
                "run mesh provision without --dry-run first"
            )
        password = kept[0]
        users.append(
            {
                "name": user.name,
                "password_hash": password_hash(password, stable_salt(user.name, password)),
                "hashing_algorithm": SHA256,
                "tags": list(user.tags),
            }
        )
        p = user.permissions
        permissions.append(
            {
                "user": user.name,
                "vhost": vhost,
                "configure": p.configure,
                "write": p.write,
                "read": p.read,
            }
        )
        topic_permissions += [
            {
                "user": user.name,
                "vhost": vhost,
                "exchange": t.exchange,
                "write": t.write,
                "read": t.read,
            }
            for t in p.topics
        ]
    objects = {} if plan.objects is None else plan.objects.definitions(vhost)
    return {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        **objects,
    }


def dumps(defined: dict[str, Any]) -> str:
    """The file's text: the same definitions, the same bytes."""
    return json.dumps(defined, indent=2) + "\n"
