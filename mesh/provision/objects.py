"""The mesh's own exchanges, queues and bindings, as RabbitMQ definitions describe them.

What ``topology.declare_exchanges`` declares (the gateway does, and agents whose user may),
which a provisioned agent may not declare itself (its retry path is its own: it declares that
under its queue prefix).  Provisioning imports what is missing; the
definitions file holds them all.  The arguments must be those ``topology`` declares, or a
declare fails as inequivalent; ``tests/test_provision.py`` declares them over an imported file
to prove it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from mesh import topology
from mesh.config import Settings

Definition = dict[str, Any]


@dataclass(frozen=True)
class MeshObjects:
    exchanges: tuple[Definition, ...]
    queues: tuple[Definition, ...]
    bindings: tuple[Definition, ...]

    def names(self) -> list[str]:
        return [o["name"] for o in (*self.exchanges, *self.queues)]

    def missing(self, exchanges: Collection[str], queues: Collection[str]) -> MeshObjects | None:
        """The exchanges and queues not among those named, with every binding (binding again
        changes nothing); ``None`` when none is missing."""
        wanted = MeshObjects(
            tuple(e for e in self.exchanges if e["name"] not in exchanges),
            tuple(q for q in self.queues if q["name"] not in queues),
            self.bindings,
        )
        return wanted if wanted.names() else None

    def definitions(self, vhost: str | None = None) -> dict[str, list[Definition]]:
        """As definitions: each object naming ``vhost`` (for a server-wide import), or none
        (for an import into one vhost)."""
        where = {} if vhost is None else {"vhost": vhost}
        return {
            "exchanges": [where | e for e in self.exchanges],
            "queues": [where | q for q in self.queues],
            "bindings": [where | b for b in self.bindings],
        }


def mesh_objects(settings: Settings) -> MeshObjects:
    """The mesh's objects; the dead-letter stream's limits and the retry delays come from
    ``settings``."""
    exchanges = [
        _exchange(name, "topic")
        for name in (
            topology.POLICY_EXCHANGE,
            topology.TOPIC_EXCHANGE,
            topology.INTERNAL_POLICY_EXCHANGE,
            topology.INTERNAL_EXCHANGE,
            topology.DEAD_LETTER_EXCHANGE,
        )
    ]
    exchanges.append(_exchange(topology.FILING_EXCHANGE, "fanout"))
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
    return MeshObjects(tuple(exchanges), tuple(queues), tuple(bindings))


def _exchange(name: str, kind: str, arguments: Definition | None = None) -> Definition:
    return {
        "name": name,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": arguments or {},
    }


def _queue(name: str, arguments: Definition) -> Definition:
    return {"name": name, "durable": True, "auto_delete": False, "arguments": arguments}


def _binding(source: str, queue: str, key: str) -> Definition:
    return {
        "source": source,
        "destination": queue,
        "destination_type": "queue",
        "routing_key": key,
        "arguments": {},
    }
