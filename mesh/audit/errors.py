"""What the audit trail raises."""

from __future__ import annotations


class AuditError(Exception):
    """Base of the audit trail's errors."""


class AuditUnavailable(AuditError):
    """Redis did not store the record (or could not say whether it did): do not ack the message."""


class AuditTampered(AuditError):
    """The trail does not verify, so it is not trimmed: that would destroy the evidence."""
