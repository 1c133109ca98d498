"""The gateway agent: replicas compete on ``mesh.gateway`` and relay to ``mesh.topic``."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from mesh.agent import GATEWAY_CAPABILITY, Agent
from mesh.config import ConfigError, Settings
from mesh.deadcounts import DeadLetterCounts
from mesh.gateway.audit import Audit
from mesh.gateway.authenticate import Authenticate
from mesh.gateway.authorize import Authorize
from mesh.gateway.decode import Decode
from mesh.gateway.filer import DeadLetterFiler
from mesh.gateway.guard import Guard
from mesh.gateway.indexer import RegistryIndexer
from mesh.gateway.pipeline import Pipeline, Stage
from mesh.gateway.relay import InternalRelay, Relay
from mesh.gateway.replies import BindReplies
from mesh.gateway.schema import SchemaCheck
from mesh.membership import REDIS_DOWN
from mesh.policy import Policy, PolicyError, load_policy

logger = logging.getLogger(__name__)


def default_stages(
    gateway: str = "gateway",
    *,
    authorize: Authorize | None = None,
    schema: SchemaCheck | None = None,
    indexer: RegistryIndexer | None = None,
    replies: BindReplies | None = None,
) -> list[Stage]:
    """The gateway's stages.  ``authorize`` enforces a policy (without it: open mode);
    ``schema`` checks payloads against the policy's schemas (before the indexer and reply
    bindings act on a message it refuses); ``indexer`` keeps the registry's indexes from
    registry events, and without it discovery finds no agent; ``replies`` (a
    ``BindReplies`` on the mesh's Redis) binds replies to requests, and a gateway without it
    relays any reply."""
    optional: list[Stage] = [s for s in (authorize, schema, indexer, replies) if s is not None]
    return [Decode(), Guard(gateway), Authenticate(), *optional, Audit()]


class Gateway(Agent):
    """Run with ``mesh gateway``; start as many replicas as the load needs."""

    capabilities = [GATEWAY_CAPABILITY]
    behaviours = [Relay, InternalRelay, DeadLetterFiler]
    control_commands = frozenset({"ping"})
    broadcast_control = False
    indexes_registry = True

    def __init__(
        self, id: str = "gateway", *, stages: list[Stage] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(id, **kwargs)
        self.policy = _load_policy(self.settings)
        if stages is None:
            namespace = self.settings.namespace
            authorize = None if self.policy is None else Authorize(self.policy, namespace)
            schemas = None if self.policy is None else self.policy.schemas
            stages = default_stages(
                self.id,
                authorize=authorize,
                schema=SchemaCheck(schemas) if schemas is not None and schemas.declared else None,
                indexer=RegistryIndexer(self.registry),
                replies=BindReplies(self.redis, namespace),
            )
        pipeline = Pipeline(stages)
        for name in (Relay.name, InternalRelay.name):
            relay = self.behaviour_map[name]
            assert isinstance(relay, Relay)
            relay.pipeline = pipeline
        filer = self.behaviour_map[DeadLetterFiler.name]
        assert isinstance(filer, DeadLetterFiler)
        filer.counts = DeadLetterCounts(self.redis, self.settings.namespace)

    async def on_start(self) -> None:
        if self.policy is None:
            logger.warning(
                "gateway %s runs in open mode: no policy (MESH_POLICY), so identities and "
                "authorization are not enforced and every sender is trusted",
                self.id,
            )
        else:
            logger.info("gateway %s enforces the policy %s", self.id, self.policy.source)
        await super().on_start()
        self.add_future(self._sweep_registry())

    async def _sweep_registry(self) -> None:
        """Take instances whose records lapsed out of the registry's indexes, now and then
        (a clean leave does it at once; a crash leaves it to this)."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_ttl)
            try:
                swept = await self.registry.sweep()
            except REDIS_DOWN as exc:
                logger.debug("registry sweep skipped (Redis unreachable: %s)", exc)
                continue
            if swept:
                logger.info("took %d lapsed instances out of the registry's indexes", swept)


def _load_policy(settings: Settings) -> Policy | None:
    if settings.policy is None:
        return None
    try:
        return load_policy(Path(settings.policy))
    except PolicyError as exc:
        raise ConfigError(f"MESH_POLICY: {'; '.join(exc.lines())}") from None
