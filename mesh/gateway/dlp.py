"""DLP stages: what a payload must not carry is refused, masked or reported (``mesh.dlp``).

``SizeCap`` runs before any stage parses the body (``schema``): a payload over the DLP size
limit is refused unparsed.  ``DataLossPrevention`` runs after ``schema`` (a payload is known
well-formed before it is searched) on events, requests and replies, not on the mesh's own
registry and control traffic.  ``block`` findings refuse the message; ``redact``
findings are masked in the copy relayed (``x-mesh-redacted`` names the JSON paths changed);
``alert`` findings pass.  Every finding goes to the audit record as kind and path: no value
appears in a reason, a notice, a log line or the trail.
"""

from __future__ import annotations

from mesh.dlp import PayloadTooLarge, Scanner
from mesh.envelope import encode_body
from mesh.gateway.pipeline import Denied, Passage

SHOWN = 5
"""Findings a denial names; the audit record holds them all."""
BLOCK = "block"

_MESH_OWN = ("_registry.", "_ctl.")


class SizeCap:
    name = "dlp"

    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner

    async def __call__(self, passage: Passage) -> None:
        if passage.routing_key.startswith(_MESH_OWN):
            return
        try:
            self.scanner.check_size(passage.incoming.body)
        except PayloadTooLarge as exc:
            raise Denied(self.name, str(exc)) from None


class DataLossPrevention:
    name = "dlp"

    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner

    async def __call__(self, passage: Passage) -> None:
        key = passage.routing_key
        if key.startswith(_MESH_OWN):
            return
        try:
            payload = passage.payload()
        except ValueError:
            raise Denied(self.name, "the payload is not JSON") from None
        result = self.scanner.scan(payload, topic=key)
        passage.findings += [(f.kind, f.path) for f in result.findings]
        if result.blocked:
            found = sorted({f"{f.kind} at {f.path}" for f in result.findings if f.action == BLOCK})
            more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
            raise Denied(self.name, f"the payload holds {', '.join(found[:SHOWN])}{more}")
        if result.redacted_paths:
            passage.body = encode_body(result.redacted)
            passage.redacted = list(result.redacted_paths)
