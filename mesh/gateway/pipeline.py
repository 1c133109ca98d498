"""The gateway pipeline: an ordered list of stages that each may deny a message."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pydantic_core
from aio_pika.abc import AbstractIncomingMessage

logger = logging.getLogger(__name__)

_UNPARSED = object()


class Denied(Exception):
    """A stage refused the message; ``reason`` goes to the sender and the audit trail, so it
    names the problem and never a value of the payload."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason

    def notice(self) -> dict[str, Any]:
        """What the sender's error notice says besides the message id."""
        return {"error": self.reason, "type": "Denied", "stage": self.stage}


class Unavailable(Exception):
    """A stage cannot decide now (Redis is unreachable): the gateway keeps the message and
    takes no more until Redis answers, rather than pass one unchecked or unaudited."""


@dataclass
class Passage:
    """One message on its way through the gateway; stages read and amend it."""

    incoming: AbstractIncomingMessage
    routing_key: str
    headers: dict[str, Any] = field(default_factory=dict)
    user: str | None = None
    """The sender's broker user, set by the authenticate stage."""
    principal: str | None = None
    """The principal the policy decided for (with a policy), set by the authorize stage."""
    delegated_by: str | None = None
    """The delegating principal (the bridge) that acted on behalf of ``principal``."""
    would_deny: str | None = None
    """Why an ``audit``-mode rule would have denied the message, which passed."""
    body: bytes | None = None
    """The body to relay when a stage changed it (redaction); ``None``: the sender's."""
    redacted: list[str] = field(default_factory=list)
    """The JSON paths a stage redacted."""
    findings: list[tuple[str, str]] = field(default_factory=list)
    """What data-loss prevention found: (kind, JSON path), never the value."""
    _parsed: Any = field(default=_UNPARSED, init=False, repr=False)

    def payload(self) -> Any:
        """The sender's body as JSON, parsed once for every stage that reads it; ``ValueError``
        when it is not JSON (pydantic-core's parser also refuses nesting too deep to walk)."""
        if self._parsed is _UNPARSED:
            try:
                self._parsed = pydantic_core.from_json(self.incoming.body)
            except ValueError as exc:
                self._parsed = exc
        if isinstance(self._parsed, ValueError):
            raise self._parsed
        return self._parsed


class Stage(Protocol):
    """One check or transformation; raise ``Denied`` to refuse the message."""

    name: str

    async def __call__(self, passage: Passage) -> None: ...


class Pipeline:
    """Runs the stages in order; the first ``Denied`` stops the passage.

    A stage that fails unexpectedly denies that one message with an internal-error reason
    (its exception is logged, not told to the sender): the gateway keeps going.
    """

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)

    async def run(self, passage: Passage) -> None:
        for stage in self.stages:
            try:
                await stage(passage)
            except (Denied, Unavailable):
                raise
            except Exception as exc:
                logger.exception(
                    "stage %s failed on %s", stage.name, passage.incoming.message_id
                )
                raise Denied(
                    stage.name, f"internal error in the gateway ({type(exc).__name__})"
                ) from exc
