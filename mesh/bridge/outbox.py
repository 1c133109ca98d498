"""A live-stream client's bounded send buffer.

The bridge never waits for a client: whatever is for it (messages, lifecycle frames) is
appended here at once, and the client's own task sends it at the client's pace.  A client
that lets ``frames`` frames or ``size`` bytes pile up is too slow: its outbox overflows,
drops everything, and the client is disconnected (websocket close ``SLOW_CLIENT``), so it
costs the mesh and the other clients nothing but this bounded memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pydantic_core

SLOW_CLIENT = 4008
"""The websocket close code (and the event stream's last ``error`` event) of a client whose
send buffer overflowed (4000-4999 are the application's; 4008 echoes HTTP 408)."""


class Outbox:
    """Frames (JSON text) waiting to be sent to one client, at most ``frames`` / ``size``."""

    def __init__(self, frames: int, size: int) -> None:
        self.frames = frames
        self.size = size
        self.overflowed = False
        self._queue: deque[str] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self._closed = False
        self.ended = asyncio.Event()
        """Set once it overflowed or was closed: the client's sender may be stuck in a send
        to a client that reads nothing, so the client's session waits on this too."""

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, frame: str) -> None:
        """Append ``frame``, or overflow; never waits."""
        if self.overflowed or self._closed:
            return
        if len(self._queue) >= self.frames or self._bytes + len(frame) > self.size:
            self.overflowed = True
            self._queue.clear()
            self._bytes = 0
            self.ended.set()
        else:
            self._queue.append(frame)
            self._bytes += len(frame)
        self._ready.set()

    def report(self, frame: dict[str, Any]) -> None:
        """Offer ``frame`` (a dict) as JSON."""
        self.offer(pydantic_core.to_json(frame).decode())

    def close(self) -> None:
        """End ``next``: the client is going away."""
        self._closed = True
        self._ready.set()
        self.ended.set()

    async def next(self) -> str | None:
        """The next frame to send; ``None`` once the outbox overflowed or was closed."""
        while not self._queue:
            if self.overflowed or self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        frame = self._queue.popleft()
        self._bytes -= len(frame)
        return frame
