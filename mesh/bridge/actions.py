"""What a caller does on the mesh through the bridge: publish, request, control.

Each is checked first (names, the policy for the caller, the payload's schema), so a refusal
the gateway would make comes back at once and nothing is sent; then it is sent by the
bridge's agent with ``x-mesh-on-behalf-of`` naming the caller, and the gateway decides again
for that principal.  Outcomes are ``ApiError`` with the status the REST API answers and the
websocket protocol reports.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from mesh import topology
from mesh.agent import AgentStopped, RemoteError, RequestTimeout
from mesh.bridge import inputs
from mesh.bridge.access import Access
from mesh.bridge.agent import BridgeAgent
from mesh.bridge.auth import Caller
from mesh.bridge.errors import ApiError
from mesh.envelope import Message, MessageType, encode_body
from mesh.membership import REDIS_DOWN
from mesh.registry import InstanceRecord
from mesh.transport import PublishError

CONTROL_COMMANDS = ("start_behaviour", "stop_behaviour", "shutdown")
"""The control commands the bridge sends (``ping`` is what ``/agents`` shows)."""


class Actions:
    """The bridge's agent acting for callers, as ``access`` allows."""

    def __init__(self, agent: BridgeAgent, access: Access) -> None:
        self.agent = agent
        self.access = access

    async def publish(
        self, caller: Caller, topic: str, payload: Any, schema: str | None = None
    ) -> str:
        """Publish an event for ``caller``; its message id once the broker confirmed it."""
        topic = inputs.topic(topic)
        self.access.require(caller, "publish", topic)
        self.access.check_payload(topic, schema, encode_body(payload))
        try:
            return await self.agent.publish(topic, payload, headers=caller.headers, schema=schema)
        except PublishError as exc:
            raise ApiError(503, f"the broker did not take the message: {exc}") from None

    async def request(
        self,
        caller: Caller,
        agent: str,
        operation: str,
        payload: Any,
        *,
        timeout: float,
        schema: str | None = None,
    ) -> Any:
        """Call ``operation`` of ``agent`` for ``caller``; the reply's payload.

        404 when no instance is alive or none serves the operation, 403 when the gateway
        refused it, 502 when the handler failed (its error type and text), 504 when no reply
        came within ``timeout`` (the deadline in the body).
        """
        agent = inputs.name("agent id", agent)
        operation = inputs.name("operation", operation)
        key = topology.request_key(agent, operation)
        self.access.require(caller, "request", key)
        self.access.check_payload(key, schema, encode_body(payload))
        deadline = datetime.now(UTC) + timedelta(seconds=timeout)
        try:
            return await self.agent.request(
                agent, operation, payload, timeout=timeout, schema=schema, headers=caller.headers
            )
        except RequestTimeout:
            raise _timeout(f"no reply from {agent}.{operation}", timeout, deadline) from None
        except RemoteError as exc:
            raise _remote(exc.error_type, exc.detail, agent=agent, operation=operation) from None
        except (PublishError, AgentStopped) as exc:
            raise ApiError(503, f"the request could not be sent: {exc}") from None

    async def control(
        self, caller: Caller, agent: str, command: str, args: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        """Send control ``command`` to every live instance of ``agent`` for ``caller``.

        The answer lists each instance that answered with its result or error.  404 when no
        instance is alive, or when every instance says the behaviour named does not exist;
        403 when the gateway refused it; 504 when no instance answered in time.
        """
        agent = inputs.name("agent id", agent)
        key = topology.control_key(agent, command)
        self.access.require(caller, "control", key)
        self.access.check_payload(key, None, encode_body(args))
        instances = await self.live_instances(agent)
        if not instances:
            raise ApiError(404, f"no instance of agent {agent!r} is alive", agent=agent)
        deadline = datetime.now(UTC) + timedelta(seconds=timeout)
        try:
            answers = await self.agent.control(
                agent, command, args, timeout=timeout, expect=len(instances),
                headers=caller.headers,
            )
        except PublishError as exc:
            raise ApiError(503, f"the command could not be sent: {exc}") from None
        refusal = next((a for a in answers if _from_gateway(a)), None)
        if refusal is not None:
            body = _body(refusal)
            raise _remote(str(body.get("type")), str(body.get("error")), agent=agent)
        if not answers:
            raise _timeout(f"no instance of {agent} answered {command}", timeout, deadline)
        results = [_result(answer) for answer in answers]
        failed = [r for r in results if not r["ok"]]
        if failed and len(failed) == len(results):
            first = failed[0]
            status = 404 if first["error_type"] == "KeyError" else 502
            raise ApiError(
                status,
                first["error"],
                agent=agent,
                remote_type=first["error_type"],
                instances=results,
            )
        return {
            "agent": agent,
            "command": command,
            "expected": len(instances),
            "instances": sorted(results, key=lambda r: str(r["instance"])),
        }

    async def live_instances(self, agent: str) -> list[InstanceRecord]:
        """The live instances of ``agent`` in the registry; 503 when Redis does not answer."""
        try:
            return await self.agent.registry.instances(agent=agent)
        except REDIS_DOWN as exc:
            raise ApiError(503, f"the registry (Redis) did not answer: {exc}") from None


def _from_gateway(answer: Message) -> bool:
    """A notice the gateway published itself (it carries no verified sender)."""
    return answer.type is MessageType.ERROR and answer.user_id is None


def _body(answer: Message) -> dict[str, Any]:
    return answer.payload if isinstance(answer.payload, dict) else {}


def _result(answer: Message) -> dict[str, Any]:
    if answer.type is MessageType.ERROR:
        body = _body(answer)
        return {
            "instance": answer.instance,
            "ok": False,
            "error_type": str(body.get("type", "Error")),
            "error": str(body.get("error", body)),
        }
    return {"instance": answer.instance, "ok": True, "result": answer.payload}


def _remote(error_type: str, detail: str, **names: str) -> ApiError:
    """The status of an error the mesh answered with."""
    extra: dict[str, Any] = {"remote_type": error_type, **names}
    if error_type == "Denied":
        return ApiError(403, detail, stage="gateway", **extra)
    if error_type in ("NoLiveInstance", "Unroutable"):
        return ApiError(404, detail, **extra)
    return ApiError(502, detail, **extra)


def _timeout(what: str, timeout: float, deadline: datetime) -> ApiError:
    return ApiError(
        504,
        f"{what} within {timeout:g}s",
        timeout=timeout,
        deadline=deadline.isoformat(timespec="milliseconds"),
    )
