"""Topic patterns in rules: ``{self}``, and whether a rule's pattern covers a binding."""

from __future__ import annotations

import re
from functools import lru_cache

from mesh.topology import TopicError, check_pattern

SELF = "{self}"
"""Stands for the acting agent's id (a token principal's own name) in patterns and globs."""

_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_OTHER_WORD = ""
"""A word no pattern contains (words are never empty): every word a rule does not name."""


def check_rule_pattern(pattern: str) -> str:
    """Return ``pattern`` if a rule may hold it: a binding pattern whose words may be
    ``{self}``; else raise ``ValueError`` naming the problem."""
    for placeholder in _PLACEHOLDER.findall(pattern):
        if placeholder != SELF:
            raise ValueError(
                f"unknown placeholder {placeholder!r} in {pattern!r} (expected {SELF})"
            )
    words = pattern.split(".")
    if any(SELF in word and word != SELF for word in words):
        raise ValueError(f"{SELF} must be a whole word of {pattern!r}, as in vehicle.{SELF}.#")
    try:
        # Agent ids are words, so a pattern valid with a word for {self} stays valid.
        check_pattern(pattern.replace(SELF, "self"))
    except TopicError as exc:
        raise ValueError(str(exc)) from None
    return pattern


def expand(text: str, self_id: str) -> str:
    """``text`` with ``{self}`` replaced by ``self_id``."""
    return text.replace(SELF, self_id) if SELF in text else text


@lru_cache(maxsize=8192)  # the gateway asks about the same few bindings over and over
def covers(rule: str, binding: str) -> bool:
    """Whether every topic ``binding`` matches, the pattern ``rule`` matches too.

    Word by word, a literal is covered by itself, ``*`` or ``#``; ``*`` by ``*`` or ``#``;
    ``#`` only by ``#``, but aligning words alone misses cases such as ``*.#`` covering
    ``#.*`` (both: one word or more).  So both patterns run as automata side by side, over
    every word either names plus one neither does, looking for a topic of one word or more
    that ``binding`` matches and ``rule`` does not.  That is exact: a pattern treats all
    the words it does not name alike.
    """
    if rule in ("#", binding):
        return True
    r, b = rule.split("."), binding.split(".")
    words = {w for w in (*r, *b) if w not in ("*", "#")} | {_OTHER_WORD}
    start = (_closure(b, frozenset({0})), _closure(r, frozenset({0})))
    seen, todo = {start}, [start]
    while todo:
        in_binding, in_rule = todo.pop()
        for word in words:
            after_binding = _step(b, in_binding, word)
            if not after_binding:
                continue
            after_rule = _step(r, in_rule, word)
            # Checked after a word: there is no topic of no words.
            if len(b) in after_binding and len(r) not in after_rule:
                return False
            if (after_binding, after_rule) not in seen:
                seen.add((after_binding, after_rule))
                todo.append((after_binding, after_rule))
    return True


def _closure(pattern: list[str], positions: frozenset[int]) -> frozenset[int]:
    # A '#' may match no word at all: being before it is being after it too.
    out = set(positions)
    for start in positions:
        i = start
        while i < len(pattern) and pattern[i] == "#":
            i += 1
            out.add(i)
    return frozenset(out)


def _step(pattern: list[str], positions: frozenset[int], word: str) -> frozenset[int]:
    # Where the pattern can be once it has also matched ``word``.
    after = set()
    for i in positions:
        if i < len(pattern):
            if pattern[i] == "#":
                after.add(i)
            elif pattern[i] in ("*", word):
                after.add(i + 1)
    return _closure(pattern, frozenset(after))
