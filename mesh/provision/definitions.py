"""A RabbitMQ definitions file of the plan: what a broker imports at boot
(``load_definitions`` in ``rabbitmq.conf``) or through ``POST /api/definitions``.

It holds the vhost, the plan's users (password hashes of their kept passwords), their
permissions and topic permissions, and the mesh's own exchanges, queues and bindings as
``mesh.topology`` declares them, so that agents, which may only declare exchanges
passively, find them there.  The arguments must be those ``topology`` declares, or a
declare fails as inequivalent; ``tests/test_provision.py`` declares them over an
imported file to prove it.
"""

from __future__ import annotations

import json
from typing import Any

from mesh import topology
from mesh.config import Settings
from mesh.provision.credentials import CredentialStore
from mesh.provision.errors import ProvisionError
from mesh.provision.passwords import SHA256, password_hash, stable_salt
from mesh.provision.plan import Plan


def definitions(plan: Plan, store: CredentialStore, settings: Settings) -> dict[str, Any]:
    """The definitions of ``plan`` with the passwords kept in ``store``; the dead-letter
    stream's limits and the retry delays come from ``settings``.

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
    exchanges, queues, bindings = _topology(settings)
    return {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "exchanges": [{"vhost": vhost, **e} for e in exchanges],
        "queues": [{"vhost": vhost, **q} for q in queues],
        "bindings": [{"vhost": vhost, **b} for b in bindings],
    }


def dumps(defined: dict[str, Any]) -> str:
    """The file's text: the same definitions, the same bytes."""
    return json.dumps(defined, indent=2) + "\n"


Objects = list[dict[str, Any]]


def _topology(settings: Settings) -> tuple[Objects, Objects, Objects]:
    """The exchanges, queues and bindings ``topology.declare_exchanges`` declares, and the
    retry queues of ``settings.retry_delays`` (``topology.declare_retry_queue``)."""
    exchanges = [
        _exchange(name, "topic")
        for name in (
            topology.POLICY_EXCHANGE,
            topology.TOPIC_EXCHANGE,
            topology.INTERNAL_POLICY_EXCHANGE,
            topology.INTERNAL_EXCHANGE,
            topology.DEAD_LETTER_EXCHANGE,
            topology.RETRY_EXCHANGE,
        )
    ]
    exchanges += [
        _exchange(
            topology.REQUEUE_EXCHANGE,
            "topic",
            {"alternate-exchange": topology.DEAD_LETTER_EXCHANGE},
        ),
        _exchange(topology.FILING_EXCHANGE, "fanout"),
    ]
    max_bytes = settings.dead_letter_max_bytes
    queues = [
        _queue(
            topology.GATEWAY_QUEUE,
            {"x-queue-type": "quorum", "x-dead-letter-exchange": topology.DEAD_LETTER_EXCHANGE},
        ),
        _queue(
            topology.INTERNAL_GATEWAY_QUEUE,
            {"x-queue-type": "classic", "x-message-ttl": topology.INTERNAL_TTL_MS},
        ),
        _queue(topology.DEAD_LETTER_INCOMING, {"x-queue-type": "quorum"}),
        _queue(
            topology.DEAD_LETTER_QUEUE,
            {
                "x-queue-type": "stream",
                "x-max-length-bytes": max_bytes,
                "x-max-age": settings.dead_letter_max_age,
                "x-stream-max-segment-size-bytes": max(min(max_bytes // 10, 100_000_000), 100_000),
            },
        ),
    ]
    bindings = [
        _binding(topology.POLICY_EXCHANGE, topology.GATEWAY_QUEUE, "#"),
        _binding(topology.INTERNAL_POLICY_EXCHANGE, topology.INTERNAL_GATEWAY_QUEUE, "#"),
        # aio-pika binds with the queue's name when given no key, fanout or not.
        _binding(topology.FILING_EXCHANGE, topology.DEAD_LETTER_QUEUE, topology.DEAD_LETTER_QUEUE),
        _binding(topology.DEAD_LETTER_EXCHANGE, topology.DEAD_LETTER_INCOMING, "#"),
    ]
    for delay in sorted({max(1, round(d * 1000)) for d in settings.retry_delays}):
        name = topology.retry_queue(delay)
        queues.append(
            _queue(
                name,
                {
                    "x-queue-type": "quorum",
                    "x-message-ttl": delay,
                    "x-dead-letter-exchange": topology.REQUEUE_EXCHANGE,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )
        )
        bindings.append(_binding(topology.RETRY_EXCHANGE, name, f"{delay}.#"))
    return exchanges, queues, bindings


def _exchange(name: str, kind: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": arguments or {},
    }


def _queue(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "durable": True, "auto_delete": False, "arguments": arguments}


def _binding(source: str, queue: str, key: str) -> dict[str, Any]:
    return {
        "source": source,
        "destination": queue,
        "destination_type": "queue",
        "routing_key": key,
        "arguments": {},
    }
