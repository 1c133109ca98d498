"""Authorize stage: the sender is who its broker user says, and the policy allows what it sends.

Runs after ``authenticate`` (which established the broker-verified user).  With a policy:

- the sender's broker user must be the one provisioned for the principal its ``app_id``
  belongs to (``broker_user``): user ``mesh.vehicles`` cannot speak as ``monitor``;
- a principal that delegates (the bridge) may name a token principal in
  ``x-mesh-on-behalf-of``; the policy then decides for that principal; from anyone else
  the header is refused;
- events are ``publish``, ``_req`` keys ``request``, ``_reply``/``_err`` keys ``reply``,
  ``_ctl`` keys ``control``; a registry event must be about the sender itself;
- a decision in an ``audit`` rule set that would deny is logged and the message passes.

Decisions come from ``Policy.decide``, cached per (agent, action, target, on behalf of).
"""

from __future__ import annotations

import json
import logging

from mesh.envelope import H_ON_BEHALF_OF
from mesh.gateway.pipeline import Denied, Passage
from mesh.policy import Policy
from mesh.policy.model import Action
from mesh.policy.users import broker_user

logger = logging.getLogger(__name__)

_ACTIONS: dict[str, Action] = {
    "_req": "request",
    "_reply": "reply",
    "_err": "reply",
    "_ctl": "control",
}


class Authorize:
    name = "authorize"

    def __init__(self, policy: Policy, namespace: str) -> None:
        self.policy = policy
        # Built once: the stage runs for every message.
        self._users = {p.name: broker_user(namespace, p.name) for p in policy.principals()}

    async def __call__(self, passage: Passage) -> None:
        incoming = passage.incoming
        agent = incoming.app_id or ""
        principal = self.policy.principal_for_agent(agent)
        if principal is None:
            raise Denied(self.name, f"agent {agent!r} is no principal of the policy")
        expected = self._users[principal.name]
        if passage.user != expected:
            raise Denied(
                self.name,
                f"agent {agent!r} belongs to principal {principal.name!r}, whose broker user "
                f"is {expected!r}, not {passage.user!r}",
            )
        passage.principal = principal.name
        key = passage.routing_key
        if key.startswith("_registry."):
            self._registry_event(agent, incoming.body)
            return
        on_behalf_of = passage.headers.get(H_ON_BEHALF_OF)
        if on_behalf_of is not None:
            if not principal.delegates:
                raise Denied(
                    self.name,
                    f"principal {principal.name!r} may not act on behalf of others "
                    f"({H_ON_BEHALF_OF}: {on_behalf_of!r})",
                )
            on_behalf_of = str(on_behalf_of)
            passage.principal, passage.delegated_by = on_behalf_of, principal.name
        action = _ACTIONS.get(key.split(".", 1)[0], "publish")
        try:
            decision = self.policy.decide(agent, action, key, on_behalf_of=on_behalf_of)
        except ValueError as exc:
            raise Denied(self.name, str(exc)) from None
        if not decision.allowed:
            raise Denied(self.name, f"{action} {key!r}: {decision.reason}")
        if decision.would_deny:
            passage.would_deny = f"{action} {key!r}: {decision.reason}"
            logger.warning(
                "would deny %s %r from %s (%s): %s",
                action,
                key,
                agent,
                principal.name,
                decision.reason,
            )

    def _registry_event(self, agent: str, body: bytes) -> None:
        """A registry event may speak only of its sender."""
        try:
            about = json.loads(body).get("agent")
        except (ValueError, AttributeError):
            about = None
        if about != agent:
            raise Denied(self.name, f"a registry event from {agent!r} about {about!r}")
