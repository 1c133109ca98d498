"""Agent id and message id in every log record, through context variables."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.util import find_spec

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


LEVELS = ("debug", "info", "warning", "error", "critical")
"""The levels the ``mesh`` command's ``--log-level`` takes."""

LIBRARY_FLOORS = {name: logging.INFO for name in ("aiormq", "aio_pika", "redis", "asyncio")}
"""The least severe level logged from these libraries whatever ``--log-level`` says: at debug,
aiormq logs every frame it sends (two to three lines a second on an idle agent), which buries
the mesh's line per message."""


class ModeLifecycleFilter(logging.Filter):
    """Drops mode's lines below WARNING (``[^Worker]: Starting...``, ``Gathering all futures``).

    mode logs a service's lifecycle under the logger of the service's own module (an agent's
    ``examples.vehicles``), so only where the call was made tells them apart; they say nothing
    that the mesh's own start and stop lines do not.
    """

    def __init__(self) -> None:
        super().__init__()
        # Found, not imported: commands that log need not pay for importing mode.
        spec = find_spec("mode")
        locations = spec.submodule_search_locations if spec else None
        # With the separator: a package named "model…" beside it is not mode's.
        self._mode = os.path.join(locations[0], "") if locations else "//no mode//"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self._mode)


def configure(level: int | str = logging.INFO, *, brief: bool = False) -> None:
    """Log to stderr with the mesh's context; for the ``mesh`` command, not for libraries.

    ``brief``: the message alone, for a command that runs once (``mesh publish``), as the
    commands that log nothing themselves show a warning.
    """
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.addFilter(ModeLifecycleFilter())
    handler.setFormatter(logging.Formatter("%(message)s" if brief else LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name, floor in LIBRARY_FLOORS.items():
        logging.getLogger(name).setLevel(max(root.level, floor))
