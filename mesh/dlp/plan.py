"""What a scanner looks for on one topic: the rules that apply there, compiled once.

Built-in detectors share one combined pattern (``detectors.prefilter``); pattern rules
share a second one, each rule a named group.  When several rules on a topic name the same
detector, the strongest action wins (block, then redact, then alert) and the finding names
that rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from mesh.dlp.detectors import SECRET_KINDS, Context, prefilter
from mesh.dlp.fold import fold
from mesh.dlp.kinds import SSN
from mesh.dlp.rules import Action, DlpRuleSpec, scoped

STRENGTH: dict[str, int] = {"alert": 0, "redact": 1, "block": 2}

KeyInfo = tuple[str | None, bool, Any]
"""What a dict key says about its value: the kind of secret a key word announces (or
``None``), whether it speaks of SSNs, and the key as paths show it (masked if it holds a
finding itself)."""


Hit = tuple[str, int, int, str, Action, int]
"""A finding in one text: (kind, start and end in the original text, the span's folded text
(what a mask keeps characters of), the action, the rule).  A tuple: one is made for every
finding, and a tuple costs a fraction of an object."""


def _nothing(text: str) -> None:
    return None


class Plan:
    """The rules of one topic, compiled; ``keys`` caches what key names without findings
    say, across payloads."""

    def __init__(self, rules: Sequence[tuple[int, DlpRuleSpec]]) -> None:
        decisions: dict[str, tuple[Action, int]] = {}
        groups: list[str] = []
        self._pattern_rules: dict[str, tuple[str, Action, int]] = {}
        for index, rule in rules:
            if rule.pattern is not None:
                group = f"r{index}"
                groups.append(f"(?P<{group}>{scoped(rule.pattern)})")
                self._pattern_rules[group] = (rule.kinds[0], rule.action, index)
                continue
            for kind in rule.kinds:
                held = decisions.get(kind)
                if held is None or STRENGTH[rule.action] > STRENGTH[held[0]]:
                    decisions[kind] = (rule.action, index)
        self.decisions = decisions
        self.kinds = frozenset(decisions)
        self._prefilter = prefilter(self.kinds)
        self._custom = re.compile("|".join(groups)) if groups else None
        self._contexts = (Context(self.kinds), Context(self.kinds, ssn_key=True))
        self.search: Callable[[str], re.Match[str] | None] = (
            _nothing if self._prefilter is None else self._prefilter.pattern.search
        )
        """Where a text may hold a built-in finding (a match, or ``None``): one pass."""
        self.custom_search: Callable[[str], object] | None = (
            None if self._custom is None else self._custom.search
        )
        self.secret_names = bool(self.kinds & SECRET_KINDS)
        self.ssn_names = SSN in self.kinds
        self.keys: dict[Any, KeyInfo] = {}

    def find(
        self, text: str, ssn_key: bool = False, first: re.Match[str] | None = None
    ) -> tuple[list[Hit], str]:
        """Every finding in ``text``, and the text as the detectors read it (folded).
        ``first``: what ``search`` already found in ``text``, if it did."""
        folded = fold(text)
        scanned = text if folded is None else folded.text
        found: list[tuple[str, int, int, Action, int]] = []
        if self._prefilter is not None:
            context = self._contexts[ssn_key]
            first = first if folded is None else None  # a match in the text, not the folded
            for kind, start, end in self._prefilter.spans(scanned, context, first):
                action, rule = self.decisions[kind]
                found.append((kind, start, end, action, rule))
        if self._custom is not None:
            for match in self._custom.finditer(scanned):
                if match.end() > match.start():
                    kind, action, rule = self._pattern_rules[match.lastgroup or ""]
                    found.append((kind, match.start(), match.end(), action, rule))
        if folded is None:
            return [(k, s, e, scanned[s:e], a, r) for k, s, e, a, r in found], scanned
        return [(k, *folded.original(s, e), scanned[s:e], a, r) for k, s, e, a, r in found], (
            scanned
        )
