"""Client: a connection to the mesh that hosts no behaviours (for commands and bridges)."""

from __future__ import annotations

import uuid
from typing import Any

from mesh.agent import Agent


class Client(Agent):
    """Publishes, requests and sends control commands; it is not registered and does
    not answer control commands, so it never shows up in ``mesh agents`` or ``mesh ping``."""

    registered = False
    controllable = False

    def __init__(self, id: str | None = None, **kwargs: Any) -> None:
        super().__init__(id or f"client-{uuid.uuid4().hex[:8]}", **kwargs)
