"""The tamper-evident audit trail: one record per gateway decision, in Redis streams.

Each gateway replica appends to a chain of its own (``AuditWriter``), each record sealed with
an HMAC-SHA256 over it and the record before, keyed with the gateway's secret, which never
reaches Redis.  Signed checkpoints tie the chains together and keep verification working after
old records are trimmed.  ``verify_audit`` names the first record that does not verify;
``AuditReader`` lists records for ``mesh audit tail``, ``query`` and ``export``.
"""

from mesh.audit.checkpoint import ChainPosition, Checkpoint
from mesh.audit.errors import AuditError, AuditTampered, AuditUnavailable
from mesh.audit.keys import AuditKeys
from mesh.audit.reader import AuditEntry, AuditFilter, AuditReader, ChainInfo
from mesh.audit.record import DECISIONS, AuditRecord, Decision, Finding, payload_sha256
from mesh.audit.trim import TrimReport, trim
from mesh.audit.verify import ChainReport, Problem, ProblemKind, VerifyReport, verify_audit
from mesh.audit.writer import AuditWriter

__all__ = [
    "DECISIONS",
    "AuditEntry",
    "AuditError",
    "AuditFilter",
    "AuditKeys",
    "AuditReader",
    "AuditRecord",
    "AuditTampered",
    "AuditUnavailable",
    "AuditWriter",
    "ChainInfo",
    "ChainPosition",
    "ChainReport",
    "Checkpoint",
    "Decision",
    "Finding",
    "Problem",
    "ProblemKind",
    "TrimReport",
    "VerifyReport",
    "payload_sha256",
    "trim",
    "verify_audit",
]
