"""Authenticate stage: the sender's identity is the broker user RabbitMQ verified."""

from __future__ import annotations

from mesh.envelope import H_USER
from mesh.gateway.pipeline import Denied, Passage


class Authenticate:
    """Requires ``user_id``; RabbitMQ refuses a ``user_id`` other than the connection's user,
    so a present ``user_id`` is trustworthy.  It travels on as ``x-mesh-user``."""

    name = "authenticate"

    async def __call__(self, passage: Passage) -> None:
        user = passage.incoming.user_id
        if not user:
            raise Denied(
                self.name,
                "message has no user_id; the gateway accepts only "
                "messages whose sender RabbitMQ verified",
            )
        passage.user = user
        passage.headers[H_USER] = user
