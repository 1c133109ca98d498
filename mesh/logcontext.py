"""Agent id and message id in every log record, through context variables."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

agent_id: ContextVar[str] = ContextVar("mesh_agent_id", default="-")
message_id: ContextVar[str] = ContextVar("mesh_message_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s [%(agent_id)s %(message_id)s] %(name)s: %(message)s"


class ContextFilter(logging.Filter):
    """Adds ``agent_id`` and ``message_id`` attributes to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "agent_id"):
            record.agent_id = agent_id.get()
        if not hasattr(record, "message_id"):
            record.message_id = message_id.get()
        return True


@contextmanager
def handling(message: str) -> Iterator[None]:
    """Within the block, log records carry ``message`` as their message id."""
    token = message_id.set(message)
    try:
        yield
    finally:
        message_id.reset(token)


def configure(level: int | str = logging.INFO) -> None:
    """Log to stderr with the mesh's context; for the ``mesh`` command, not for libraries."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
