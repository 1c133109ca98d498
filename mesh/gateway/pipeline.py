"""The gateway pipeline: an ordered list of stages that each may deny a message."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aio_pika.abc import AbstractIncomingMessage


class Denied(Exception):
    """A stage refused the message; ``reason`` goes to the sender and the dead letter."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass
class Passage:
    """One message on its way through the gateway; stages read and amend it."""

    incoming: AbstractIncomingMessage
    routing_key: str
    headers: dict[str, Any] = field(default_factory=dict)
    user: str | None = None
    """The sender's broker user, set by the authenticate stage."""


class Stage(Protocol):
    """One check or transformation; raise ``Denied`` to refuse the message."""

    name: str

    async def __call__(self, passage: Passage) -> None: ...


class Pipeline:
    """Runs the stages in order; the first ``Denied`` stops the passage."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)

    async def run(self, passage: Passage) -> None:
        for stage in self.stages:
            await stage(passage)
