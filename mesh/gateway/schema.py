"""Schema stage: payloads follow the schema versions the policy accepts on their routing key.

Runs after ``authorize`` (a sender learns what it may not send before how to send it) and
before ``replies`` (a refused request leaves no reply binding behind).  Events and requests
are checked where the policy declares schemas (``schemas`` in the policy file); the mesh's
own traffic only where it declares some for it, replies never.  The message names its
version in ``x-mesh-schema`` (``reading@2``); see ``mesh.policy.schemas`` for what is refused
and why.  The validators and the lookup per routing key are the policy's, compiled once, so
a message costs a cached lookup and one validation.
"""

from __future__ import annotations

from mesh.envelope import H_SCHEMA
from mesh.gateway.pipeline import Denied, Passage
from mesh.policy.schemas import PayloadSchemas, SchemaViolation


class SchemaCheck:
    name = "schema"

    def __init__(self, schemas: PayloadSchemas) -> None:
        self.schemas = schemas

    async def __call__(self, passage: Passage) -> None:
        expectation = self.schemas.expectation(passage.routing_key)
        if expectation is None:
            return
        named = passage.headers.get(H_SCHEMA)
        if isinstance(named, bytes):  # AMQP long strings arrive as bytes from some clients
            named = named.decode("utf-8", "replace")
        try:
            schema = expectation.version(None if named is None else str(named))
            try:
                payload = passage.payload() if passage.incoming.body else None
            except ValueError:
                raise SchemaViolation(f"the payload is not JSON ({schema.id})") from None
            expectation.validate(schema, payload)
        except SchemaViolation as exc:
            raise Denied(self.name, str(exc)) from None
