"""Data-loss prevention: find cards, IBANs, SSNs, e-mail addresses, phone numbers, cloud keys,
private keys, tokens and secrets in JSON payloads, and block, redact or report them.

``Scanner(rules).scan(payload, topic=...)`` returns a ``ScanResult``: the ``Finding``s (kind,
JSON path, action, rule; never the value), the payload with ``redact`` findings masked, the
paths redaction changed, and whether a ``block`` finding refuses the message.
``Scanner.check_size(body)`` refuses an oversized payload before it is parsed.
``DlpRuleSpec`` (one rule) and ``DlpSpec`` (the ``dlp:`` section) are the policy file's.
"""

from mesh.dlp.kinds import DETECTORS, Detector
from mesh.dlp.rules import ACTIONS, DEFAULT_MAX_BYTES, Action, DlpRuleSpec, DlpSpec
from mesh.dlp.scanner import Finding, PayloadTooLarge, Scanner, ScanResult

__all__ = [
    "ACTIONS",
    "DEFAULT_MAX_BYTES",
    "DETECTORS",
    "Action",
    "Detector",
    "DlpRuleSpec",
    "DlpSpec",
    "Finding",
    "PayloadTooLarge",
    "ScanResult",
    "Scanner",
]
