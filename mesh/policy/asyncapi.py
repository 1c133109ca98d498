"""The mesh's topics and request operations with their payload schemas, as an AsyncAPI 3.0
document (``mesh schema export``).

One channel per topic pattern of a ``payloads`` entry, its address the pattern with each
``*`` and ``#`` a parameter (the exact pattern is kept in ``x-mesh-pattern``), with a ``send``
operation (agents publish to ``mesh.policy``) and a ``receive`` one (subscribers bind the
pattern on ``mesh.topic``).  One channel per request entry, ``_req.{agent}.{operation}``,
whose ``send`` operation has a reply on the caller's own ``_reply`` route.  One message per
schema version, told apart by the ``x-mesh-schema`` header it must carry; its payload is the
schema as the gateway applies it (Draft 2020-12, in a multi-format schema object).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from mesh import topology
from mesh.envelope import CONTENT_TYPE, H_SCHEMA
from mesh.policy.policy import Policy
from mesh.policy.schemas import PayloadRule, SchemaVersion

ASYNCAPI_VERSION = "3.0.0"
SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
"""How a payload's schema is declared: AsyncAPI's default format is its own draft-07 dialect,
and these are Draft 2020-12 (``$defs``, ``prefixItems`` …)."""
AMQP_BINDING = "0.3.0"

_ID_CHARS = re.compile(r"[^\w.\-]")
_GLOB_CHARS = frozenset("*?[")

_ERROR_MESSAGE: dict[str, Any] = {
    "name": "error",
    "title": "Error",
    "summary": "The handler failed, the request was invalid, or the gateway denied it.",
    "contentType": CONTENT_TYPE,
    "payload": {
        "type": "object",
        "properties": {
            "error": {"type": "string", "description": "What went wrong."},
            "type": {"type": "string", "description": "Denied, Unroutable, the error's type …"},
            "stage": {"type": "string", "description": "The gateway stage that denied it."},
        },
        "required": ["error", "type"],
    },
}
_REPLY_MESSAGE: dict[str, Any] = {
    "name": "reply",
    "title": "Reply",
    "summary": "The operation's result (replies are not checked against schemas).",
    "contentType": CONTENT_TYPE,
}


def asyncapi_document(
    policy: Policy, *, title: str | None = None, version: str = "1.0.0"
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``policy``'s schemas, as plain data (JSON or YAML)."""
    schemas = policy.schemas
    source = str(policy.source) if policy.source is not None else "the policy"
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    ids = {"replies"}  # the replies channel's, should a request entry need it
    for versions in schemas.definitions.values():
        for schema in versions.values():
            messages[_message_id(schema)] = _message(schema)
    replies_used = False
    for rule in schemas.rules:
        if rule.agent is not None:
            channel_id = _unique(_identifier(f"request.{rule.agent}.{rule.operation}"), ids)
            channels[channel_id] = _request_channel(rule)
            operations[channel_id] = _request_operation(channel_id, rule)
            replies_used = True
            continue
        for pattern in rule.topics:
            channel_id = _unique(_identifier(pattern), ids)
            channels[channel_id] = _topic_channel(pattern, rule)
            refs = _message_refs(channel_id, rule.accepted)
            operations[f"{channel_id}.send"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "summary": f"An agent publishes on {pattern} (to {_exchange(pattern)}).",
                "messages": refs,
            }
            operations[f"{channel_id}.receive"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{channel_id}"},
                "summary": f"A subscriber binding {pattern} receives what the gateway "
                f"relayed (on {topology.delivery_exchange(pattern)}).",
                "messages": refs,
            }
    if replies_used:
        channels["replies"] = _replies_channel()
        messages["reply"] = _REPLY_MESSAGE
        messages["error"] = _ERROR_MESSAGE
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title or f"agentmesh: {source}",
            "version": version,
            "description": (
                f"Topics and request operations whose payloads {source} checks at the "
                f"gateway. A message names the schema version it was written against in "
                f"the {H_SCHEMA} header (name@version); one naming none, or one its topic "
                "does not accept, is denied, as is a payload that fails its schema."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }
    if schemas.require:
        document["x-mesh-require"] = list(schemas.require)
    return document


def _message_id(schema: SchemaVersion) -> str:
    return _identifier(f"{schema.name}.v{schema.version}")


def _message(schema: SchemaVersion) -> dict[str, Any]:
    return {
        "name": schema.name,
        "title": schema.id,
        "summary": f"Version {schema.version} of schema {schema.name} ({schema.source}).",
        "contentType": CONTENT_TYPE,
        "headers": {
            "type": "object",
            "properties": {H_SCHEMA: {"type": "string", "const": schema.id}},
            "required": [H_SCHEMA],
        },
        "payload": {"schemaFormat": SCHEMA_FORMAT, "schema": schema.schema},
        "x-mesh-schema": schema.id,
    }


def _message_refs(channel_id: str, accepted: Iterable[SchemaVersion]) -> list[dict[str, str]]:
    return [{"$ref": f"#/channels/{channel_id}/messages/{_message_id(s)}"} for s in accepted]


def _channel_messages(accepted: Iterable[SchemaVersion]) -> dict[str, Any]:
    return {
        _message_id(s): {"$ref": f"#/components/messages/{_message_id(s)}"} for s in accepted
    }


def _topic_channel(pattern: str, rule: PayloadRule) -> dict[str, Any]:
    address: list[str] = []
    parameters: dict[str, Any] = {}
    for word in pattern.split("."):
        if word in ("*", "#"):
            name = f"{'word' if word == '*' else 'words'}{len(parameters) + 1}"
            parameters[name] = {
                "description": "one word of the topic (*)"
                if word == "*"
                else "any number of words of the topic, none included (#)"
            }
            address.append(f"{{{name}}}")
        else:
            address.append(word)
    return {
        "address": ".".join(address),
        "title": pattern,
        "description": (
            f"Events on topics matching the AMQP topic pattern {pattern} (payloads entry "
            f"{rule.index + 1}); accepted: {', '.join(s.id for s in rule.accepted)}."
        ),
        **({"parameters": parameters} if parameters else {}),
        "messages": _channel_messages(rule.accepted),
        "bindings": {"amqp": _amqp_binding(_exchange(pattern))},
        "x-mesh-pattern": pattern,
    }


def _request_channel(rule: PayloadRule) -> dict[str, Any]:
    assert rule.agent is not None and rule.operation is not None
    parameters: dict[str, Any] = {}
    words = []
    for name, glob in (("agent", rule.agent), ("operation", rule.operation)):
        if _GLOB_CHARS.isdisjoint(glob):
            words.append(glob)
            continue
        words.append(f"{{{name}}}")
        what = "agent id" if name == "agent" else name
        parameters[name] = {"description": f"the {what}, matching the glob {glob}"}
    return {
        "address": ".".join(["_req", *words]),
        "title": f"requests to {rule.agent} operation {rule.operation}",
        "description": (
            f"Requests (payloads entry {rule.index + 1}); accepted: "
            f"{', '.join(s.id for s in rule.accepted)}. The caller waits for one reply."
        ),
        **({"parameters": parameters} if parameters else {}),
        "messages": _channel_messages(rule.accepted),
        "bindings": {"amqp": _amqp_binding(topology.INTERNAL_POLICY_EXCHANGE)},
        "x-mesh-request": {"agent": rule.agent, "operation": rule.operation},
    }


def _request_operation(channel_id: str, rule: PayloadRule) -> dict[str, Any]:
    return {
        "action": "send",
        "channel": {"$ref": f"#/channels/{channel_id}"},
        "summary": f"Call operation {rule.operation} on an agent matching {rule.agent}.",
        "messages": _message_refs(channel_id, rule.accepted),
        "reply": {
            "address": {
                "location": "$message.header#/reply_to",
                "description": "The caller's own _reply.<agent>.<instance> route, in the "
                "AMQP reply_to property.",
            },
            "channel": {"$ref": "#/channels/replies"},
            "messages": [
                {"$ref": "#/channels/replies/messages/reply"},
                {"$ref": "#/channels/replies/messages/error"},
            ],
        },
    }


def _replies_channel() -> dict[str, Any]:
    return {
        "address": "_reply.{agent}.{instance}",
        "title": "replies",
        "description": "Replies and errors, to the instance that asked (on mesh.internal).",
        "parameters": {
            "agent": {"description": "the calling agent's id"},
            "instance": {"description": "the calling instance's id"},
        },
        "messages": {
            "reply": {"$ref": "#/components/messages/reply"},
            "error": {"$ref": "#/components/messages/error"},
        },
        "bindings": {"amqp": _amqp_binding(topology.INTERNAL_EXCHANGE)},
    }


def _exchange(pattern: str) -> str:
    return topology.policy_exchange(pattern)


def _amqp_binding(exchange: str) -> dict[str, Any]:
    return {
        "is": "routingKey",
        "exchange": {"name": exchange, "type": "topic", "durable": True, "autoDelete": False},
        "bindingVersion": AMQP_BINDING,
    }


def _identifier(text: str) -> str:
    # Component and channel ids are letters, digits, '.', '-' and '_'.
    return _ID_CHARS.sub("_", text.replace("*", "any").replace("#", "all"))


def _unique(candidate: str, taken: set[str]) -> str:
    chosen, n = candidate, 1
    while chosen in taken:
        n += 1
        chosen = f"{candidate}-{n}"
    taken.add(chosen)
    return chosen
