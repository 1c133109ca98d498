"""Globs over agent ids (``vehicle-*``, ``v[0-9]*``): checking them, and whether two overlap."""

from __future__ import annotations

import re
import string
from fnmatch import fnmatchcase
from functools import cache

from mesh.policy.topics import SELF

ID_CHARS = frozenset(string.ascii_letters + string.digits + "_-")
"""What an agent id is made of (``mesh.topology.check_name``)."""

_TOKEN = re.compile(r"\*|\?|\[(!?)([^\]]+)\]|(\{self\})|([A-Za-z0-9_-])|(.)")

Token = frozenset[str] | None
"""One position of a glob: the characters it takes there, or ``None`` for ``*``."""


def check_glob(glob: str, *, self_allowed: bool = False) -> str:
    """Return ``glob`` if it can match agent ids (their characters, ``*``, ``?``, ``[...]``,
    and in rules ``{self}``), else raise ``ValueError`` saying what is wrong."""
    if not glob:
        raise ValueError("empty agent id or glob")
    if SELF in glob and not self_allowed:
        raise ValueError(f"{SELF} stands for the acting agent in rules; it cannot name agents here")
    _tokens(glob)
    return glob


def is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def matches(glob: str, agent: str) -> bool:
    """Whether ``agent`` matches ``glob`` (case-sensitive, like agent ids)."""
    return fnmatchcase(agent, glob)


def overlap(first: str, second: str) -> bool:
    """Whether some agent id matches both globs."""
    a, b = _tokens(first), _tokens(second)

    @cache
    def common(i: int, j: int) -> bool:
        # Whether a[i:] and b[j:] can match one and the same string.
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] is None:
            return common(i + 1, j) or (j < len(b) and common(i, j + 1))
        if j < len(b) and b[j] is None:
            return common(i, j + 1) or (i < len(a) and common(i + 1, j))
        if i < len(a) and j < len(b):
            first_chars, second_chars = a[i], b[j]
            assert first_chars is not None and second_chars is not None
            return bool(first_chars & second_chars) and common(i + 1, j + 1)
        return False

    return common(0, 0)


@cache
def _tokens(glob: str) -> tuple[Token, ...]:
    tokens: list[Token] = []
    for match in _TOKEN.finditer(glob):
        negate, members, placeholder, char, bad = match.groups()
        if bad is not None:
            if bad == "{":
                raise ValueError(f"bad glob {glob!r}: unknown placeholder (expected {SELF})")
            problem = "an unclosed '['" if bad == "[" else f"{bad!r}, which no agent id contains"
            raise ValueError(
                f"bad glob {glob!r}: it has {problem} (agent ids are letters, digits, '-' "
                "and '_'; globs add *, ? and [...])"
            )
        if placeholder is not None:
            # {self} is some agent id: for overlap, as wide as '*'.
            tokens.append(None)
        elif char is not None:
            tokens.append(frozenset(char))
        elif members is not None:
            tokens.append(_char_class(glob, members, negate == "!"))
        elif match.group() == "*":
            tokens.append(None)
        else:
            tokens.append(ID_CHARS)
    return tuple(tokens)


def _char_class(glob: str, members: str, negate: bool) -> frozenset[str]:
    chars: set[str] = set()
    i = 0
    while i < len(members):
        if i + 2 < len(members) and members[i + 1] == "-":
            low, high = members[i], members[i + 2]
            if low > high:
                raise ValueError(f"bad glob {glob!r}: range {low}-{high} is backwards")
            chars.update(chr(c) for c in range(ord(low), ord(high) + 1))
            i += 3
        else:
            chars.add(members[i])
            i += 1
    outside = chars - ID_CHARS
    if outside and not negate:
        raise ValueError(
            f"bad glob {glob!r}: [{members}] holds {''.join(sorted(outside))!r}, "
            "which no agent id contains"
        )
    taken = ID_CHARS - chars if negate else chars & ID_CHARS
    if not taken:
        raise ValueError(f"bad glob {glob!r}: [{'!' if negate else ''}{members}] matches nothing")
    return frozenset(taken)
