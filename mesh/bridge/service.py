"""The bridge as a running service: its agent, the policy and tokens it checks callers
against, the live stream, and whether it is ready."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from starlette.requests import HTTPConnection

from mesh import topology
from mesh.bridge.access import Access
from mesh.bridge.actions import Actions
from mesh.bridge.agent import BridgeAgent
from mesh.bridge.auth import Authenticator
from mesh.bridge.config import BridgeConfig
from mesh.bridge.outcomes import Outcomes
from mesh.bridge.stream import Stream
from mesh.config import Settings
from mesh.policy import Policy, Principal, TokenStore
from mesh.policy.users import broker_user

logger = logging.getLogger(__name__)

READY_TIMEOUT = 2.0
"""Seconds ``/ready`` waits for Redis's answer."""


class BridgeError(ValueError):
    """The bridge cannot serve with this policy or these settings; the text says why."""


class Bridge:
    """One bridge instance.  ``policy`` ``None`` is open mode, which ``config`` must allow
    (``insecure_open``): no tokens, every caller anonymous and allowed everything.

    Use as an async context manager, or ``start`` and ``stop``.
    """

    def __init__(
        self,
        settings: Settings,
        config: BridgeConfig | None = None,
        policy: Policy | None = None,
        *,
        tokens: TokenStore | None = None,
    ) -> None:
        self.settings = settings
        self.config = config or BridgeConfig()
        self.policy = policy
        self.principal = check_policy(policy, self.config)
        if policy is not None and tokens is None:
            tokens = TokenStore.for_policy(policy)
        self.outcomes = Outcomes(self.config.outcome_window)
        self.agent = BridgeAgent(self.config.agent_id, outcomes=self.outcomes, settings=settings)
        self.access = Access(policy, self.agent.id)
        self.auth = Authenticator(tokens)
        self.actions = Actions(self.agent, self.access)
        self.stream = Stream(
            self.agent, self.access, self.outcomes, self.config.stream_queue_length
        )
        self.started = False

    @property
    def open_mode(self) -> bool:
        return self.policy is None

    async def start(self) -> None:
        await self.agent.start()
        try:
            await self.stream.start()
        except BaseException:
            await self.agent.stop()
            raise
        self.started = True
        if self.principal is not None:
            logger.info(
                "bridge %s acts as principal %s (broker user %s) for the policy's users",
                self.agent.id,
                self.principal.name,
                broker_user(self.settings.namespace, self.principal.name),
            )
        else:
            logger.warning(
                "bridge %s serves in OPEN MODE: no policy (MESH_POLICY), so no tokens are "
                "checked and anyone who reaches it may publish, call and control anything "
                "(first steps only)",
                self.agent.id,
            )

    async def stop(self) -> None:
        self.started = False
        await self.stream.stop()
        await self.agent.stop()

    async def __aenter__(self) -> Bridge:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def readiness(self) -> dict[str, str]:
        """``ok`` or what is wrong, for the broker and Redis."""
        checks = {"broker": "ok", "redis": "ok"}
        connection = self.agent.transport.connection if self.started else None
        if connection is None or connection.is_closed or not connection.connected.is_set():
            checks["broker"] = "not connected"
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self.agent.redis.ping()
        except Exception as exc:  # any failure means not ready; the text says which
            checks["redis"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return checks


def check_policy(policy: Policy | None, config: BridgeConfig) -> Principal | None:
    """The bridge's principal under ``policy``; ``BridgeError`` unless it can serve.

    Without one, only with ``insecure_open``.  With one, the bridge's agent id must belong
    to a principal that delegates (kind ``bridge``): the gateway accepts
    ``x-mesh-on-behalf-of`` from no one else.
    """
    topology.check_name("agent id", config.agent_id)
    topology.check_name("gateway id", config.gateway_id)
    if policy is None:
        if not config.insecure_open:
            raise BridgeError(
                "no policy (MESH_POLICY): the bridge would let anyone who reaches it publish, "
                "call and control anything; give it the mesh's policy, or pass "
                "--insecure-open to serve without tokens (first steps only)"
            )
        return None
    principal = policy.principal_for_agent(config.agent_id)
    if principal is None:
        raise BridgeError(
            f"agent id {config.agent_id!r} is no principal of the policy: declare one, e.g. "
            f"{config.agent_id}: {{kind: bridge}}"
        )
    if not principal.delegates:
        raise BridgeError(
            f"principal {principal.name!r} (agent id {config.agent_id!r}) does not delegate: "
            "the gateway would refuse everything the bridge sends for its callers; make it "
            "kind: bridge (or delegates: true)"
        )
    return principal


def bridge_of(connection: HTTPConnection) -> Bridge:
    """The bridge serving ``connection`` (``create_app`` puts it in the app's state)."""
    bridge = connection.app.state.bridge
    assert isinstance(bridge, Bridge)
    return bridge
