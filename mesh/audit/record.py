"""One gateway decision, as the audit trail keeps it: who sent what where, and what became of it.

Payloads are kept as their SHA-256 and DLP findings as kind and path, never the values found:
the trail proves what passed without becoming a second copy of the data it guards.
"""

from __future__ import annotations

import hashlib
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Decision = Literal["allowed", "denied", "redacted", "would-deny"]
"""``would-deny``: an ``audit`` rule set would have denied it, and the message passed."""

DECISIONS: tuple[Decision, ...] = ("allowed", "denied", "redacted", "would-deny")


def payload_sha256(body: bytes) -> str:
    """The hex SHA-256 of a message body, as ``AuditRecord.payload_sha256`` keeps it."""
    return hashlib.sha256(body).hexdigest()


MAX_PATH = 1024
"""The longest ``Finding.path`` a record keeps."""


class Finding(BaseModel):
    """What DLP found where: ``kind`` (``email``, ``iban`` …) at ``path`` (``$.patient.email``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(max_length=64)
    path: str = Field(max_length=MAX_PATH)


class AuditRecord(BaseModel):
    """One gateway decision.  Unknown fields are refused, so no value slips in beside them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    time: float = Field(default_factory=time.time)
    """When the gateway decided (Unix seconds, the gateway's clock)."""
    decision: Decision
    stage: str | None = None
    """The stage that denied, redacted or would have denied it."""
    reason: str | None = None
    principal: str | None = None
    """The principal the policy decided for (a token user when the bridge acts for one)."""
    delegated_by: str | None = None
    """The principal that acted on ``principal``'s behalf (the bridge), if any."""
    user: str | None = None
    """The sender's broker user, as RabbitMQ verified it."""
    agent: str | None = None
    instance: str | None = None
    type: str | None = None
    topic: str
    """The routing key: a user topic or one of the mesh's own (``_req.…``)."""
    message_id: str | None = None
    correlation_id: str | None = None
    payload_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    findings: tuple[Finding, ...] = ()

    def dump(self) -> bytes:
        """The JSON the trail stores (and seals) for this record."""
        return self.model_dump_json(exclude_none=True).encode()
