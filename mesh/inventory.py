"""The mesh's queues as an operator sees them: depth, consumers, drops, and whose they are.

Queue names say whose a queue is (``topology``): ``mesh.q.<agent>.<behaviour>`` is shared
by an agent's instances, ``mesh.i.<agent>.<instance>.…`` belongs to one instance; the
gateway's, the dead letters' and the retry delays' queues belong to the mesh.  The broker's
management API lists them; the registry says whether their owner still runs; the dead-letter
counts say how many each dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mesh import topology
from mesh.deadcounts import DeadLetterCounts
from mesh.management import ManagementAPI, QueueInfo
from mesh.registry import Registry

MESH_OWNER = "(mesh)"
"""The owner of the gateway's, dead letters' and retry delays' queues."""

_SHARED = "mesh.q."
_INSTANCE = "mesh.i."


@dataclass(frozen=True)
class QueueReport:
    name: str
    type: str
    messages: int
    consumers: int
    dropped: int
    """Oldest messages dropped because the queue was full (``max_queue_length``)."""
    dead: int
    """Dead letters from this queue, all reasons (drops included)."""
    owner: str
    """The agent the queue belongs to, or ``MESH_OWNER``."""
    instance: str | None
    """The instance, for a queue of one instance."""
    live: bool
    """Whether the owner (that instance, for an instance's queue) is in the registry."""

    @property
    def state(self) -> str:
        return "live" if self.live else "gone"


def owner_of(queue: str) -> tuple[str, str | None] | None:
    """``(agent, instance or None)`` a mesh queue belongs to; ``None`` for other queues."""
    for prefix, per_instance in ((_SHARED, False), (_INSTANCE, True)):
        if queue.startswith(prefix):
            words = queue[len(prefix) :].split(".")
            if per_instance and len(words) >= 2:
                return words[0], words[1]
            if not per_instance and words:
                return words[0], None
    if queue.startswith("mesh."):
        return MESH_OWNER, None
    return None


class Inventory:
    """Answers ``mesh queues`` and ``mesh forget``."""

    def __init__(
        self, api: ManagementAPI, vhost: str, registry: Registry, counts: DeadLetterCounts
    ) -> None:
        self.api = api
        self.vhost = vhost
        self.registry = registry
        self.counts = counts

    async def queues(self, agent: str | None = None) -> list[QueueReport]:
        """The mesh's queues (only ``agent``'s when given), sorted by name."""
        listed = await self.api.queues(self.vhost)
        deaths = await self.counts.by_queue()
        live = await self.registry.instances()
        agents = {i.agent for i in live}
        instances = {(i.agent, i.instance) for i in live}
        reports = []
        for queue in sorted(listed, key=lambda q: q.name):
            owner = owner_of(queue.name)
            if owner is None or (agent is not None and owner[0] != agent):
                continue
            died = deaths.get(queue.name)
            name, instance = owner
            reports.append(
                QueueReport(
                    name=queue.name,
                    type=queue.type,
                    messages=queue.messages,
                    consumers=queue.consumers,
                    dropped=died.dropped if died else 0,
                    dead=died.total if died else 0,
                    owner=name,
                    instance=instance,
                    live=name == MESH_OWNER
                    or ((name, instance) in instances if instance else name in agents),
                )
            )
        return reports

    async def forget(self, agent: str, queues: Sequence[QueueInfo | QueueReport]) -> None:
        """Delete ``agent``'s ``queues``, its own exchanges (its retry path) and the counts
        kept about the queues."""
        for queue in queues:
            await self.api.delete_queue(self.vhost, queue.name)
        own = {topology.retry_exchange(agent), topology.requeue_exchange(agent)}
        for exchange in await self.api.exchanges(self.vhost):
            if exchange in own:
                await self.api.delete_exchange(self.vhost, exchange)
        await self.counts.forget([q.name for q in queues])
