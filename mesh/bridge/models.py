"""The bodies the REST API answers with, as pydantic models: the routes build their answers
with them and the OpenAPI document takes its schemas from them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from mesh.audit import AuditRecord
from mesh.registry import AgentRecord


class Error(BaseModel):
    """Every refusal: what is wrong and its kind; some add fields (``limit``, ``deadline``,
    ``remote_type``, ``stage``, ``principal``)."""

    model_config = ConfigDict(extra="allow")

    error: str
    type: str


class Health(BaseModel):
    status: str
    """Always ``ok``: the process answers."""
    agent: str
    instance: str
    mode: str
    """``policy`` (tokens checked, the policy applied) or ``open`` (neither)."""


class Ready(BaseModel):
    ready: bool
    broker: str
    redis: str
    """``ok``, or what is wrong."""


class Accepted(BaseModel):
    """An event the broker confirmed: it is on its way to the gateway."""

    message_id: str
    topic: str


class Agents(BaseModel):
    agents: list[AgentRecord]


class InstanceAnswer(BaseModel):
    """One instance's answer to a control command."""

    instance: str | None
    ok: bool
    result: Any = None
    error_type: str | None = None
    error: str | None = None


class ControlResult(BaseModel):
    agent: str
    command: str
    expected: int
    """How many live instances the registry listed (each is asked)."""
    instances: list[InstanceAnswer]
    """Those that answered in time."""


class AuditEntry(BaseModel):
    """A record of the audit trail with what seals it (``mesh audit export``'s lines)."""

    chain: str
    id: str
    """Its stream entry id (Redis time of the append, ms, and a counter)."""
    seq: int
    kid: str
    prev: str
    mac: str
    record: AuditRecord


class AuditPage(BaseModel):
    records: list[AuditEntry]
    """Newest first."""
    scanned: int
    """Records read to find these; the bridge reads at most a bounded number per query."""
    complete: bool
    """Whether every record in range was read (else narrow the query, or use ``until``)."""


SCHEMAS: tuple[type[BaseModel], ...] = (
    Error,
    Health,
    Ready,
    Accepted,
    Agents,
    ControlResult,
    AuditPage,
)
"""The models the OpenAPI document lists under ``components.schemas``."""
