"""The gateway's record of its decisions: a structured log line each, and the audit trail.

Every message the relay decides on is recorded once: allowed, redacted, would-deny (an
``audit``-mode rule would have denied it) or denied, with the stage and reason, who sent it
(principal, delegating principal, broker user, agent, instance), where, its ids, the SHA-256
of its payload and DLP findings as kind and path, never a value.  With an audit key the record
is appended to the tamper-evident trail (``mesh.audit``) and the relay acts on the message only
once it is stored; without one it is logged only (``mesh.gateway.audit`` at INFO).
"""

from __future__ import annotations

import logging

from mesh.audit import (
    AuditRecord,
    AuditUnavailable,
    AuditWriter,
    Decision,
    Finding,
    payload_sha256,
)
from mesh.audit.record import MAX_PATH
from mesh.envelope import H_INSTANCE
from mesh.gateway.pipeline import Denied, Passage, Unavailable

audit_log = logging.getLogger("mesh.gateway.audit")


class AuditTrail:
    """Records decisions; ``writer`` (``None``: log only) keeps them in the audit trail."""

    def __init__(self, writer: AuditWriter | None = None) -> None:
        self.writer = writer

    async def record(self, passage: Passage, denied: Denied | None = None) -> str | None:
        """Record what became of ``passage``; the id of its audit record (``chain/entry``),
        ``None`` when there is no trail.  Raises ``Unavailable`` if the trail cannot store it."""
        logged = audit_log.isEnabledFor(logging.INFO)
        if self.writer is None and not logged:
            return None  # nothing would keep the record: do not build it
        return await self.keep(self._record(passage, denied))

    async def keep(self, record: AuditRecord) -> str | None:
        """Log ``record`` and append it to the trail, as ``record`` does: for the gateway's
        decisions about something other than a passing message (redrives)."""
        if audit_log.isEnabledFor(logging.INFO):
            audit_log.info(
                "%s %s from %s/%s (%s) on %s%s",
                record.decision,
                record.message_id,
                record.user,
                record.agent,
                record.principal or "-",
                record.topic,
                f": {record.stage}: {record.reason}" if record.reason else "",
                extra={"audit": record.model_dump(mode="json", exclude_none=True)},
            )
        if self.writer is None:
            return None
        try:
            entry = await self.writer.append(record)
        except AuditUnavailable as exc:
            raise Unavailable(f"audit trail: {exc}") from exc
        return f"{self.writer.chain}/{entry}"

    @staticmethod
    def _record(passage: Passage, denied: Denied | None) -> AuditRecord:
        decision: Decision
        stage = reason = None
        if denied is not None:
            decision, stage, reason = "denied", denied.stage, denied.reason
        elif passage.redacted:
            decision, stage = "redacted", "dlp"
            reason = f"redacted {', '.join(passage.redacted)}"
        elif passage.would_deny is not None:
            decision, stage, reason = "would-deny", "authorize", passage.would_deny
        else:
            decision = "allowed"
        incoming = passage.incoming
        instance = (incoming.headers or {}).get(H_INSTANCE)
        return AuditRecord(
            decision=decision,
            stage=stage,
            reason=reason,
            principal=passage.principal,
            delegated_by=passage.delegated_by,
            user=passage.user or incoming.user_id,
            agent=incoming.app_id,
            instance=instance if isinstance(instance, str) else None,
            type=incoming.type,
            topic=passage.routing_key,
            message_id=incoming.message_id,
            correlation_id=incoming.correlation_id,
            payload_sha256=payload_sha256(incoming.body),
            findings=tuple(
                Finding(kind=kind, path=_clipped(path)) for kind, path in passage.findings
            ),
        )


def _clipped(path: str) -> str:
    """A finding's JSON path as a record keeps it: a payload's keys may make it longer than
    that (the record would be refused, and with it the decision), so it keeps the start."""
    return path if len(path) <= MAX_PATH else f"{path[: MAX_PATH - 1]}…"
