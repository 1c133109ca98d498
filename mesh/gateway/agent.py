"""The gateway agent: replicas compete on ``mesh.gateway`` and relay to ``mesh.topic``."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from mesh.agent import GATEWAY_CAPABILITY, Agent
from mesh.audit import AuditWriter
from mesh.behaviour import rpc
from mesh.config import ConfigError, Settings
from mesh.deadcounts import DeadLetterCounts
from mesh.envelope import Message
from mesh.gateway.audit import AuditTrail
from mesh.gateway.authenticate import Authenticate
from mesh.gateway.authorize import Authorize
from mesh.gateway.decode import Decode
from mesh.gateway.dlp import DataLossPrevention, SizeCap
from mesh.gateway.filer import DeadLetterFiler
from mesh.gateway.gate import RedisGate
from mesh.gateway.guard import Guard
from mesh.gateway.indexer import RegistryIndexer
from mesh.gateway.pipeline import Pipeline, Stage
from mesh.gateway.ratelimit import RateLimit
from mesh.gateway.redrive import Redriver
from mesh.gateway.relay import InternalRelay, Relay
from mesh.gateway.replies import BindReplies
from mesh.gateway.schema import SchemaCheck
from mesh.membership import REDIS_DOWN
from mesh.policy import Policy, PolicyError, load_policy
from mesh.ratelimit import RateLimiter
from mesh.redrive import REDRIVE, RedriveRequest

logger = logging.getLogger(__name__)


def default_stages(
    gateway: str = "gateway",
    *,
    authorize: Authorize | None = None,
    rate_limit: RateLimit | None = None,
    size_cap: SizeCap | None = None,
    schema: SchemaCheck | None = None,
    dlp: DataLossPrevention | None = None,
    indexer: RegistryIndexer | None = None,
    replies: BindReplies | None = None,
) -> list[Stage]:
    """The gateway's stages, in order.  ``authorize`` enforces a policy (without it: open
    mode); ``rate_limit``, ``schema`` and ``dlp`` apply its limits, payload schemas and
    data-loss prevention (before the indexer and reply bindings act on a message they
    refuse), ``size_cap`` DLP's size limit before anything parses the body; ``indexer`` keeps the
    registry's indexes from registry events, and without it discovery finds no agent;
    ``replies`` (a ``BindReplies`` on the mesh's Redis) binds replies to requests, and a
    gateway without it relays any reply."""
    optional = (authorize, rate_limit, size_cap, schema, dlp, indexer, replies)
    return [Decode(), Guard(gateway), Authenticate(), *(s for s in optional if s is not None)]


class Gateway(Agent):
    """Run with ``mesh gateway``; start as many replicas as the load needs.

    Every decision is recorded (``AuditTrail``): in the tamper-evident audit trail when an
    audit key is set (``MESH_AUDIT_KEY`` or ``MESH_AUDIT_KEY_FILE``), else in the log only.
    Its ``redrive`` operation puts dead letters back into their queues for operators and
    the bridge's callers (``mesh.gateway.redrive``).
    """

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
            stages = self._stages(self.policy)
        self.audit_writer = _audit_writer(self.redis, self.settings, f"{self.id}-{self.instance}")
        self.gate = RedisGate(self.redis)
        pipeline, trail = Pipeline(stages), AuditTrail(self.audit_writer)
        for name in (Relay.name, InternalRelay.name):
            relay = self.behaviour_map[name]
            assert isinstance(relay, Relay)
            relay.pipeline, relay.trail, relay.gate = pipeline, trail, self.gate
        filer = self.behaviour_map[DeadLetterFiler.name]
        assert isinstance(filer, DeadLetterFiler)
        filer.counts = DeadLetterCounts(self.redis, self.settings.namespace)
        self.redriver = Redriver(self, self.policy, trail)

    @rpc(REDRIVE, model=RedriveRequest)
    async def redrive(self, msg: Message, request: RedriveRequest) -> dict[str, Any]:
        """Put dead letters back into their queues for an operator (``mesh dead redrive``)
        or a caller of the bridge (``POST /dead/{id}/redrive``)."""
        return (await self.redriver(msg, request)).model_dump(mode="json")

    def _stages(self, policy: Policy | None) -> list[Stage]:
        namespace = self.settings.namespace
        indexer = RegistryIndexer(self.registry)
        replies = BindReplies(self.redis, namespace)
        if policy is None:
            return default_stages(self.id, indexer=indexer, replies=replies)
        limits = policy.rate_limits
        schemas = policy.schemas
        return default_stages(
            self.id,
            authorize=Authorize(policy, namespace),
            rate_limit=RateLimit(policy, RateLimiter(self.redis, namespace, limits))
            if limits
            else None,
            schema=SchemaCheck(schemas) if schemas.declared else None,
            size_cap=None if policy.scanner is None else SizeCap(policy.scanner),
            dlp=None if policy.scanner is None else DataLossPrevention(policy.scanner),
            indexer=indexer,
            replies=replies,
        )

    async def on_start(self) -> None:
        if self.policy is None:
            logger.warning(
                "gateway %s runs in open mode: no policy (MESH_POLICY), so identities and "
                "authorization are not enforced and every sender is trusted",
                self.id,
            )
        else:
            logger.info("gateway %s enforces the policy %s", self.id, self.policy.source)
        if self.audit_writer is None:
            logger.warning(
                "gateway %s keeps no audit trail (no MESH_AUDIT_KEY or MESH_AUDIT_KEY_FILE): "
                "its decisions are only logged",
                self.id,
            )
        else:
            await self.audit_writer.start()
            logger.info("gateway %s audits to chain %s", self.id, self.audit_writer.chain)
        await super().on_start()
        self.add_future(self._sweep_registry())

    async def on_drained(self) -> None:
        await self.gate.close_probe()
        if self.audit_writer is not None:
            try:
                await self.audit_writer.close()
            except REDIS_DOWN as exc:
                logger.error("audit trail: the last checkpoint was not written (%s)", exc)

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


def _audit_writer(redis: aioredis.Redis, settings: Settings, replica: str) -> AuditWriter | None:
    if settings.audit_key is None and settings.audit_key_file is None:
        return None
    return AuditWriter.from_settings(redis, settings, replica)


def _load_policy(settings: Settings) -> Policy | None:
    if settings.policy is None:
        return None
    try:
        return load_policy(Path(settings.policy))
    except PolicyError as exc:
        raise ConfigError(f"MESH_POLICY: {'; '.join(exc.lines())}") from None
