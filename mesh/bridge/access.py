"""The policy as the bridge applies it before anything leaves: a caller learns at once (403,
422) what the gateway would refuse, and sees in the registry only what it may.

Sending decisions are the gateway's own, asked of the same compiled policy for the caller
(``Policy.decide(bridge, action, key, on_behalf_of=principal)``), with the reason worded as
the gateway words it.  The gateway decides again as each message passes, so a bridge whose
policy file differs from the gateway's never lets more through than the gateway allows:
what the bridge passes and the gateway refuses comes back refused (a request's or control
command's ``Denied`` is a 403 too).

What a caller may *see* the policy does not say, since reads never pass the gateway. The
bridge's rule: a caller sees an agent in the registry (``/agents``, registry events) when it
may ping it (``control`` ``_ctl.<agent>.ping``, and ``ping`` answers exactly that record) or
may request one of the operations the agent serves (its ``_req.<agent>.<op>`` bindings).
Live messages it may receive are those of patterns it may ``subscribe`` to.  In the audit
trail (``/audit``) it sees the records of its own actions and of events on topics it may
subscribe to.
"""

from __future__ import annotations

from collections.abc import Iterable

from mesh import topology
from mesh.audit import AuditRecord
from mesh.bridge.auth import Caller
from mesh.bridge.errors import ApiError
from mesh.policy import Decision, Policy
from mesh.policy.model import Action
from mesh.policy.schemas import SchemaViolation
from mesh.registry import InstanceRecord


class Access:
    """Decisions for callers of the bridge ``bridge_id``; ``policy`` ``None``: open mode."""

    def __init__(self, policy: Policy | None, bridge_id: str) -> None:
        self.policy = policy
        self.bridge_id = bridge_id

    def decide(self, caller: Caller, action: Action, target: str) -> Decision | None:
        """The policy's decision (``None`` in open mode); 400 for a target that does not fit."""
        if self.policy is None:
            return None
        try:
            return self.policy.decide(
                self.bridge_id, action, target, on_behalf_of=caller.principal
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def allows(self, caller: Caller, action: Action, target: str) -> bool:
        decision = self.decide(caller, action, target)
        return decision is None or decision.allowed

    def require(self, caller: Caller, action: Action, target: str) -> None:
        """403 with the gateway's wording unless ``caller`` may do ``action`` on ``target``."""
        decision = self.decide(caller, action, target)
        if decision is not None and not decision.allowed:
            raise ApiError(
                403,
                f"{action} {target!r}: {decision.reason}",
                principal=caller.name,
                stage="authorize",
            )

    def check_payload(self, routing_key: str, schema: str | None, body: bytes) -> None:
        """422 naming the problem unless ``body`` follows a schema ``routing_key`` accepts."""
        if self.policy is None:
            return
        expectation = self.policy.schemas.expectation(routing_key)
        if expectation is None:
            return
        try:
            expectation.check(schema, body)
        except SchemaViolation as exc:
            raise ApiError(422, str(exc), stage="schema") from None

    def may_read(self, caller: Caller, record: AuditRecord) -> bool:
        """Whether ``caller`` sees audit ``record``: one of its own actions (the gateway
        decided for it), or an event on a topic it may subscribe to (it could have received
        the message itself)."""
        if self.policy is None or record.principal == caller.principal:
            return True
        if topology.is_internal(record.topic):
            return False
        try:
            return self.policy.decide(
                self.bridge_id, "subscribe", record.topic, on_behalf_of=caller.principal
            ).allowed
        except ValueError:  # a topic the gateway refused as malformed
            return False

    def may_see(self, caller: Caller, agent: str, instances: Iterable[InstanceRecord]) -> bool:
        """Whether ``caller`` sees ``agent`` (with ``instances``) in the registry."""
        if self.policy is None:
            return True
        if self.allows(caller, "control", topology.control_key(agent, "ping")):
            return True
        prefix = topology.request_key(agent, "")
        served = {
            key
            for record in instances
            for behaviour in record.behaviours
            for key in behaviour.binding_keys
            if key.startswith(prefix)
        }
        return any(self.allows(caller, "request", key) for key in served)
