"""Audit stage: records who sent what (a structured log line until the audit stream lands)."""

from __future__ import annotations

import logging

from mesh.envelope import H_INSTANCE
from mesh.gateway.pipeline import Passage

audit_log = logging.getLogger("mesh.gateway.audit")


class Audit:
    name = "audit"

    async def __call__(self, passage: Passage) -> None:
        if not audit_log.isEnabledFor(logging.INFO):
            return
        incoming = passage.incoming
        record = {
            "user": passage.user,
            "agent": incoming.app_id,
            "instance": passage.headers.get(H_INSTANCE),
            "type": incoming.type,
            "routing_key": passage.routing_key,
            "message_id": incoming.message_id,
            "correlation_id": incoming.correlation_id,
            "bytes": len(incoming.body),
        }
        audit_log.info(
            "relay user=%(user)s agent=%(agent)s type=%(type)s key=%(routing_key)s "
            "id=%(message_id)s bytes=%(bytes)d",
            record,
            extra={"audit": record},
        )
