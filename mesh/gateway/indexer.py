"""Registry index stage: the gateway keeps discovery's indexes from the events it lets pass.

The registry's indexes (by capability, by binding pattern, every live instance) are shared by
all agents, so no agent's Redis user may write them; each instance writes only its own record.
When an instance's ``_registry.join``, ``.behaviour`` or ``.leave`` event passes (after
``authorize`` made sure the sender is the agent it speaks of), this stage makes the indexes say
what that instance's record says, or takes it out of them once its record is gone.
"""

from __future__ import annotations

import json
import logging

from mesh.gateway.pipeline import Denied, Passage
from mesh.membership import REDIS_DOWN
from mesh.registry import Registry
from mesh.topology import TopicError

logger = logging.getLogger(__name__)


class RegistryIndexer:
    name = "index"

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def __call__(self, passage: Passage) -> None:
        if not passage.routing_key.startswith("_registry."):
            return
        agent = passage.incoming.app_id or ""
        try:
            instance = json.loads(passage.incoming.body).get("instance")
        except (ValueError, AttributeError):
            instance = None
        if not isinstance(instance, str):
            raise Denied(self.name, "a registry event names no instance")
        try:
            await self.registry.index(agent, instance)
        except (TopicError, ValueError) as exc:  # also pydantic's, for a record it cannot read
            raise Denied(self.name, f"registry record of {agent}/{instance}: {exc}") from None
        except REDIS_DOWN as exc:
            # The event still passes (its subscribers need no Redis); the instance finds
            # itself unindexed at a heartbeat and announces itself again.
            logger.warning(
                "registry event of %s/%s passed unindexed (Redis unreachable: %s)",
                agent,
                instance,
                exc,
            )
