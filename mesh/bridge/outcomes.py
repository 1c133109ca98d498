"""What became of events websocket clients published: what the bridge can learn, told to
the client that sent each one.

The broker's confirm is ``accepted``.  After that the gateway tells the sender only of a
refusal: an error notice on the bridge's ``_err`` route naming the event's id (``Denied``
with the gateway's reason, ``Unroutable``), reported as ``failed``.  A pass is confirmed to
nobody, so ``delivered`` is reported only when the bridge itself receives the relayed copy,
which it does when some client of its live stream subscribes to the topic; otherwise an
event is never reported further than ``accepted``.  Each event is remembered for
``window`` seconds (at most ``limit`` at once), long enough for any refusal to come back.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.envelope import Message

Report = Callable[[dict[str, Any]], None]
"""Takes one lifecycle frame for a client (its outbox's ``offer``)."""


@dataclass(slots=True)
class _Sent:
    until: float
    op: str | None
    report: Report
    accepted: bool = False
    outcome: dict[str, Any] | None = None
    """What came back before the broker's confirm did, reported right after ``accepted``."""


class Outcomes:
    """Events sent for clients, by message id, until their window ends."""

    def __init__(self, window: float = 60.0, limit: int = 100_000) -> None:
        self.window = window
        self.limit = limit
        self._sent: OrderedDict[str, _Sent] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sent)

    def expect(self, message_id: str, op: str | None, report: Report) -> None:
        """Remember event ``message_id``, about to be sent for operation ``op`` of the client
        ``report`` tells."""
        now = time.monotonic()
        while self._sent:
            oldest = next(iter(self._sent.values()))
            if oldest.until > now and len(self._sent) < self.limit:
                break
            self._sent.popitem(last=False)
        self._sent[message_id] = _Sent(now + self.window, op, report)

    def accepted(self, message_id: str) -> None:
        """The broker confirmed event ``message_id``: report ``accepted`` (and what came
        back already, if anything did)."""
        sent = self._sent.get(message_id)
        if sent is None:
            return
        sent.accepted = True
        sent.report({"type": "accepted", "id": sent.op, "message_id": message_id})
        if sent.outcome is not None:
            del self._sent[message_id]
            sent.report(sent.outcome)

    def discard(self, message_id: str) -> None:
        """Forget event ``message_id``: sending it failed (the client was told)."""
        self._sent.pop(message_id, None)

    def forget(self, report: Report) -> None:
        """Drop what was sent for the client ``report`` tells (it went away)."""
        for message_id in [m for m, sent in self._sent.items() if sent.report == report]:
            del self._sent[message_id]

    def refused(self, notice: Message) -> bool:
        """Report the gateway's error ``notice`` as ``failed``; whether it named an event
        sent for a client."""
        body = notice.payload if isinstance(notice.payload, dict) else {}
        message_id = str(body.get("message_id", ""))
        if message_id not in self._sent:
            return False
        error_type = str(body.get("type", "Error"))
        self._settle(
            message_id,
            {
                "type": "failed",
                "message_id": message_id,
                "status": 403 if error_type == "Denied" else 502,
                "error_type": error_type,
                "error": str(body.get("error", "")),
                "stage": body.get("stage"),
            },
        )
        return True

    def relayed(self, message: Message) -> None:
        """Report ``delivered`` if ``message`` is the relayed copy of an event sent for a
        client."""
        message_id = message.message_id
        if message_id in self._sent:
            self._settle(message_id, {"type": "delivered", "message_id": message_id})

    def _settle(self, message_id: str, frame: dict[str, Any]) -> None:
        sent = self._sent[message_id]
        frame = {"type": frame["type"], "id": sent.op, **frame}
        if sent.accepted:
            del self._sent[message_id]
            sent.report(frame)
        elif sent.outcome is None:
            sent.outcome = frame
