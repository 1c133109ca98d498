"""The scanner: every string of a JSON payload, and every key, checked against the rules.

``Scanner(rules).scan(payload, topic=...)`` walks the parsed payload once, breadth first,
with no recursion (so no payload is too deep for it).  A string costs one search of the
combined pattern (``Plan.search``) unless it is short; only a string with a candidate in it,
with something to fold (``fold.needs_folding``), or under a key word such as ``password``
gets a closer look.  Dict keys are scanned too, and what a key name says is cached across
payloads.  Integers of nine digits or more are read as their digits (a card or SSN sent as
a number); redacting one puts the masked text in its place.

A finding names its kind, its JSON path, the action and the rule, never the value.  Nothing
here logs, and no exception or repr carries a value from the payload.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.dlp import fold, validators
from mesh.dlp.detectors import judge_secret
from mesh.dlp.keywords import secret_kind, ssn_context
from mesh.dlp.kinds import CARD, SSN
from mesh.dlp.paths import ROOT, Place, path
from mesh.dlp.plan import Hit, KeyInfo, Plan
from mesh.dlp.redact import Copy, masked
from mesh.dlp.rules import DEFAULT_MAX_BYTES, Action, DlpRuleSpec, DlpSpec
from mesh.topology import matches

_SHORTEST = 6
"""No built-in finding is shorter (``a@b.cd``): a shorter string is looked at only under a
key word, and by pattern rules."""
_BIG = 10**8
"""Integers this large (nine digits) or larger may be an SSN or a card number."""
_TOP: KeyInfo = (None, False, None)
"""A payload that is one string: no key, and its path is the payload's."""
_CACHED = 8192
"""Topics and key names remembered; the cache starts over when full."""


class PayloadTooLarge(ValueError):
    """A payload over the scanner's size limit, refused before it is parsed."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size:,} bytes is over the DLP limit of {limit:,} bytes")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Finding:
    """What was found and where: ``kind`` (a detector, or a pattern rule's name), the JSON
    ``path`` (``payload.items[2].note``), the ``action`` taken, and the index of the
    ``rule`` that decided it."""

    kind: str
    path: str
    action: Action
    rule: int


@dataclass(frozen=True, slots=True)
class ScanResult:
    """The findings; the payload with ``redact`` findings masked (the payload itself when
    there were none; kept out of the repr, since it holds whatever was not redacted); the
    paths that redaction changed, for ``x-mesh-redacted``; whether a ``block`` finding
    means the message must be refused."""

    findings: tuple[Finding, ...]
    redacted: Any = field(repr=False)
    redacted_paths: tuple[str, ...]
    blocked: bool


class Scanner:
    """Scans payloads against DLP rules; one per policy, shared by every message."""

    def __init__(
        self, rules: Sequence[DlpRuleSpec] = (), *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.rules = tuple(rules)
        self.max_bytes = max_bytes
        self._plans: dict[str | None, Plan] = {}
        self._shared: dict[tuple[int, ...], Plan] = {}
        fold.prepare()

    @classmethod
    def from_spec(cls, spec: DlpSpec) -> Scanner:
        """The scanner for a policy file's ``dlp:`` section."""
        return cls(spec.rules, max_bytes=spec.max_payload_bytes)

    def __repr__(self) -> str:
        return f"Scanner({len(self.rules)} rules, max_bytes={self.max_bytes})"

    def check_size(self, body: bytes) -> None:
        """Raise ``PayloadTooLarge`` if ``body`` is over the limit: before parsing it."""
        if len(body) > self.max_bytes:
            raise PayloadTooLarge(len(body), self.max_bytes)

    def scan(self, payload: Any, *, topic: str | None = None) -> ScanResult:
        """Scan a parsed JSON ``payload`` with the rules that apply to ``topic`` (every rule
        when ``None``).  Never raises; the payload is not changed."""
        walk = _Walk(self._plan(topic), payload)
        walk.run()
        if not walk.findings:
            return ScanResult((), payload, (), False)
        redacted = payload if walk.copy is None else walk.copy.result()
        return ScanResult(tuple(walk.findings), redacted, tuple(walk.changed), walk.blocked)

    def _plan(self, topic: str | None) -> Plan:
        plan = self._plans.get(topic)
        if plan is None:
            applying = tuple(
                i
                for i, rule in enumerate(self.rules)
                if topic is None or any(matches(p, topic) for p in rule.topics)
            )
            plan = self._shared.get(applying)
            if plan is None:
                plan = self._shared[applying] = Plan([(i, self.rules[i]) for i in applying])
            if len(self._plans) >= _CACHED:
                self._plans.clear()
            self._plans[topic] = plan
        return plan


class _Walk:
    """One scan: the findings so far, the changed paths, and the redacted copy."""

    __slots__ = (
        "_seen",
        "_shown_keys",
        "blocked",
        "changed",
        "copy",
        "findings",
        "payload",
        "plan",
    )

    def __init__(self, plan: Plan, payload: Any) -> None:
        self.plan = plan
        self.payload = payload
        self.findings: list[Finding] = []
        self.changed: list[str] = []
        self.blocked = False
        self.copy: Copy | None = None
        self._seen: set[tuple[str, str]] = set()
        self._shown_keys: dict[int, set[str]] = {}

    def run(self) -> None:
        payload = self.payload
        kind = type(payload)
        if kind is dict or kind is list:
            self._containers(payload)
        elif kind is str:
            self._text(payload, None, None, None, _TOP)
        elif kind is int and (payload >= _BIG or payload <= -_BIG):
            self._number(payload, None, None, None, _TOP)

    def _containers(self, top: dict[str, Any] | list[Any]) -> None:
        # The hot loop: keep it to type checks, a cached key lookup and one search.
        plan = self.plan
        keys = plan.keys
        search = plan.search
        custom = plan.custom_search
        text = self._text
        folds = fold.needs_folding
        shortest, big = _SHORTEST, _BIG
        queue: list[tuple[Any, Place | None]] = [(top, None)]
        for container, place in queue:
            if type(container) is dict:
                for key, item in container.items():
                    info = keys.get(key)
                    if info is None:
                        info = self._key(container, place, key)
                    kind = type(item)
                    if kind is str:
                        first = search(item) if len(item) >= shortest else None
                        if (
                            first is not None
                            or info[0] is not None
                            or (len(item) >= shortest and not item.isascii() and folds(item))
                            or (custom is not None and custom(item))
                        ):
                            text(item, container, place, key, info, first=first)
                    elif kind is dict or kind is list:
                        queue.append((item, (place, container, key, info[2])))
                    elif kind is int and (item >= big or item <= -big):
                        self._number(item, container, place, key, info)
            else:
                for index, item in enumerate(container):
                    kind = type(item)
                    if kind is str:
                        first = search(item) if len(item) >= shortest else None
                        if (
                            first is not None
                            or (len(item) >= shortest and not item.isascii() and folds(item))
                            or (custom is not None and custom(item))
                        ):
                            text(item, container, place, index, (None, False, index), first=first)
                    elif kind is dict or kind is list:
                        queue.append((item, (place, container, index, index)))
                    elif kind is int and (item >= big or item <= -big):
                        self._number(item, container, place, index, (None, False, index))

    def _key(self, container: dict[str, Any], place: Place | None, key: Any) -> KeyInfo:
        plan = self.plan
        if type(key) is not str:
            return (None, False, key)
        hits, name = plan.find(key)
        secret = secret_kind(name) if plan.secret_names else None
        ssn = plan.ssn_names and ssn_context(name)
        if not hits:
            if len(plan.keys) >= _CACHED:
                plan.keys.clear()
            plan.keys[key] = (secret, ssn, key)
            return (secret, ssn, key)
        # Paths show the key with every finding masked, and unique among its neighbours.
        base = shown = masked(key, [hit[:4] for hit in hits])
        taken = self._shown_keys.setdefault(id(container), set())
        number = 2
        while shown in container or shown in taken:
            shown = f"{base}~{number}"
            number += 1
        taken.add(shown)
        where = path(place, shown)
        self._record(hits, where)
        if any(hit[4] == "redact" for hit in hits):
            self._copy().rename(container, place, key, shown)
            self.changed.append(where)
        return (secret, ssn, shown)

    def _text(
        self,
        text: str,
        container: Any,
        place: Place | None,
        key: Any,
        info: KeyInfo,
        *,
        first: re.Match[str] | None = None,
    ) -> None:
        secret, ssn_key, shown = info
        plan = self.plan
        hits, scanned = plan.find(text, ssn_key, first)
        if not hits and secret is not None:
            kind = judge_secret(secret, scanned, plan.kinds)
            if kind is not None:
                action, rule = plan.decisions[kind]
                hits = [(kind, 0, len(text), scanned, action, rule)]
        if not hits:
            return
        where = ROOT if container is None else path(place, shown)
        self._record(hits, where)
        pieces = [hit[:4] for hit in hits if hit[4] == "redact"]
        if pieces:
            self._copy().set(container, place, key, masked(text, pieces))
            self.changed.append(where)

    def _copy(self) -> Copy:
        if self.copy is None:
            self.copy = Copy(self.payload)
        return self.copy

    def _number(
        self, number: int, container: Any, place: Place | None, key: Any, info: KeyInfo
    ) -> None:
        try:
            digits = str(number)
        except ValueError:  # longer than Python will print (4,300 digits): no card or SSN
            return
        plan = self.plan
        # Written as a number, only a card or (under an SSN key) an SSN can be one: check
        # that before the whole pipeline, which ids and timestamps in ms would go through.
        plain = digits.lstrip("-")
        if (
            plan.custom_search is None
            and not (CARD in plan.kinds and validators.card(plain))
            and not (SSN in plan.kinds and info[1] and validators.ssn(plain))
        ):
            return
        self._text(digits, container, place, key, info)

    def _record(self, hits: list[Hit], where: str) -> None:
        for kind, _, _, _, action, rule in hits:
            if (kind, where) not in self._seen:
                self._seen.add((kind, where))
                self.findings.append(Finding(kind, where, action, rule))
            self.blocked = self.blocked or action == "block"
