"""Agent cards, built live from the registry for the caller asking.

A mesh agent's card (``/a2a/{agent}/.well-known/agent-card.json``) lists as skills the
``@rpc`` operations its live instances serve (their ``_req.<agent>.<operation>`` bindings in
the registry) that the caller may request; the agent's capabilities are the skills' tags.
Input and output are ``application/json``.  Where the policy declares payload schemas for an
operation (``payloads: [{request: {agent, operation}, accept: […]}]``), the skill's
description names the versions and gives each JSON Schema, and the card's extension
``EXTENSION`` carries them as data, with how a message names its operation.

The card offers the JSON-RPC binding at ``/a2a/{agent}``, as protocol 1.0 and 0.3 (the same
endpoint takes both method names), with streaming; and, with a policy, HTTP bearer
authentication: the bridge's tokens (``mesh token issue``).
"""

from __future__ import annotations

import json
from typing import Any

from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_0_3, PROTOCOL_VERSION_1_0, TransportProtocol

from mesh import topology
from mesh.bridge.access import Access
from mesh.bridge.auth import Caller
from mesh.policy.schemas import PayloadSchemas
from mesh.registry import AgentRecord

JSON = "application/json"

EXTENSION = "urn:agentmesh:a2a:mesh-request:v1"
"""The card's extension: how to call (``message``) and each operation's payload schemas."""

SCHEME = "bearer"
"""The name of the card's security scheme."""

MESSAGE = {
    "metadata": {
        "operation": "the operation (skill id) to call; required",
        "schema": "the payload's schema version, name@version, where the operation has schemas",
        "timeout": "seconds to wait for the reply (optional)",
    },
    "parts": "exactly one data part: the payload",
    "result": "the reply's payload, as the data part of the task's artifact 'result'",
}


def served_operations(record: AgentRecord) -> list[str]:
    """The operations ``record``'s instances serve, from their request bindings."""
    prefix = topology.request_key(record.agent, "")
    return sorted(
        {
            key.removeprefix(prefix)
            for instance in record.instances
            for behaviour in instance.behaviours
            for key in behaviour.binding_keys
            if key.startswith(prefix)
        }
    )


class Cards:
    """Agent cards for callers, as ``access`` lets them see the agents."""

    def __init__(self, access: Access, schemas: PayloadSchemas | None) -> None:
        self.access = access
        self.schemas = schemas

    def card(self, caller: Caller, record: AgentRecord, url: str) -> AgentCard:
        """``record``'s card for ``caller``, its endpoint at ``url``."""
        operations = [
            op
            for op in served_operations(record)
            if self.access.allows(caller, "request", topology.request_key(record.agent, op))
        ]
        schemas = {op: self._schemas(record.agent, op) for op in operations}
        capabilities = ", ".join(record.capabilities) or "none declared"
        card = bridge_card(
            url,
            name=record.agent,
            description=(
                f"Mesh agent {record.agent} (capabilities: {capabilities}), called through "
                "the agentmesh bridge: each message becomes a request to one of its "
                "operations, sent on the caller's behalf and checked by the mesh's gateway "
                "(policy, payload schemas, DLP, audit)."
            ),
            version=next((i.version for i in record.instances if i.version), "unversioned"),
            secured=self.access.policy is not None,
            extension={
                "message": MESSAGE,
                "operations": {op: {"schemas": schemas[op]} for op in operations},
            },
        )
        card.skills.extend(
            _skill(record.agent, op, schemas[op], record.capabilities) for op in operations
        )
        return card

    def _schemas(self, agent: str, operation: str) -> dict[str, Any]:
        """Schema id → JSON Schema of what ``operation`` accepts (none: any JSON)."""
        if self.schemas is None:
            return {}
        expectation = self.schemas.expectation(topology.request_key(agent, operation))
        if expectation is None:
            return {}
        return {id: version.schema for id, version in expectation.accepted.items()}


def bridge_card(
    url: str,
    *,
    name: str,
    description: str,
    version: str,
    secured: bool,
    extension: dict[str, Any],
) -> AgentCard:
    """A card of the bridge's A2A endpoint at ``url``, without skills."""
    card = AgentCard(
        name=name,
        description=description,
        version=version,
        supported_interfaces=[
            AgentInterface(
                url=url,
                protocol_binding=TransportProtocol.JSONRPC.value,
                protocol_version=PROTOCOL_VERSION_1_0,
            ),
            AgentInterface(
                url=url,
                protocol_binding=TransportProtocol.JSONRPC.value,
                protocol_version=PROTOCOL_VERSION_0_3,
            ),
        ],
        capabilities=AgentCapabilities(
            streaming=True,
            push_notifications=False,
            extensions=[
                AgentExtension(
                    uri=EXTENSION,
                    description="How a message calls a mesh operation, and the JSON Schema "
                    "of each operation's payload (by schema version) where the mesh's policy "
                    "declares one.",
                    required=False,
                    params=extension,
                )
            ],
        ),
        default_input_modes=[JSON],
        default_output_modes=[JSON],
    )
    if secured:
        card.security_schemes[SCHEME].CopyFrom(
            SecurityScheme(
                http_auth_security_scheme=HTTPAuthSecurityScheme(
                    scheme="bearer",
                    description="A token of the mesh's policy: mesh token issue NAME "
                    "--policy policy.yaml",
                )
            )
        )
        card.security_requirements.append(SecurityRequirement(schemes={SCHEME: StringList()}))
    return card


def _skill(
    agent: str, operation: str, schemas: dict[str, Any], capabilities: list[str]
) -> AgentSkill:
    description = (
        f"Calls {agent}.{operation} (a mesh request/reply). Send one message whose metadata "
        f'says "operation": "{operation}" and whose one part is a data part, the payload; the '
        "reply is the data part of the task's artifact 'result'."
    )
    metadata: dict[str, Any] = {"operation": operation}
    if schemas:
        metadata["schema"] = next(iter(schemas))
        described = "; ".join(
            f"{id}: {json.dumps(schema, separators=(',', ':'))}" for id, schema in schemas.items()
        )
        description += (
            f' The payload must follow one of these schema versions, named in metadata "schema" '
            f"(JSON Schema, Draft 2020-12): {described}"
        )
    example = {"role": "ROLE_USER", "metadata": metadata, "parts": [{"data": {}}]}
    return AgentSkill(
        id=operation,
        name=operation,
        description=description,
        tags=["mesh", *capabilities],
        examples=[json.dumps(example)],
        input_modes=[JSON],
        output_modes=[JSON],
    )
