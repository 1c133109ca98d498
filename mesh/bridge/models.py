"""The bodies the REST API answers with, as pydantic models: the routes build their answers
with them and the OpenAPI document takes its schemas from them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from mesh.audit import AuditEntry
from mesh.redrive import RedriveResult
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


class AuditPage(BaseModel):
    records: list[AuditEntry]
    """Newest first."""
    scanned: int
    """Records read to find these; the bridge reads at most a bounded number per query."""
    complete: bool
    """Whether every record in range was read (else narrow the query, or use ``until``)."""


class Redriven(BaseModel):
    """That a dead letter was redriven: when (ISO 8601), by which user and agent (the
    bridge's, with ``on_behalf_of`` its caller), into which queue, its audit record."""

    time: str
    user: str | None
    agent: str | None
    queue: str
    audit: str | None = None
    on_behalf_of: str | None = None


class DeadLetterSummary(BaseModel):
    """A dead letter as ``mesh dead list --json`` shows it (``DeadLetter.summary``)."""

    id: int
    """Its offset in ``mesh.dead``."""
    filed_at: str | None
    sent_at: str | None
    queue: str
    topic: str
    type: str
    reason: str
    message_id: str
    sender: str | None
    sender_instance: str | None
    sender_user: str | None
    dead_by: str | None
    dead_by_user: str | None
    redriven: Redriven | None = None


class DeadLetters(BaseModel):
    dead_letters: list[DeadLetterSummary]
    """Oldest first, the newest last."""
    complete: bool
    """Whether the whole stream was read (else only its newest dead letters, a bounded
    number)."""


SCHEMAS: tuple[type[BaseModel], ...] = (
    Error,
    Health,
    Ready,
    Accepted,
    Agents,
    ControlResult,
    AuditPage,
    DeadLetters,
    RedriveResult,
)
"""The models the OpenAPI document lists under ``components.schemas``."""
