"""Text as the detectors read it: the evasions that leave a value readable to a person undone.

Folding maps each character on its own: invisible ones (format characters such as the
zero-width space and joiner, soft hyphen, BOM and tag characters; combining marks; controls)
go, other scripts' digits become ASCII digits, Unicode spaces and dashes become ``" "`` and
``"-"``, and compatibility forms become their NFKC form (fullwidth digit four, U+FF14, is
``4``; circled digit one, U+2460, is ``1``).  Per character rather than NFKC over the whole
text so that every folded character comes from one original character, and a span found in
the folded text maps back onto the original (``Folded.original``): redaction masks the
original in place and leaves the rest of it as it was.

ASCII text needs no folding, and neither does most other text; ``fold`` answers ``None``
for both, after one C-level search for a character to fold.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass
from functools import cache, lru_cache

_DROPPED = frozenset({"Cf", "Mn", "Me", "Cc", "Cs"})
# Where Unicode has assigned characters that fold: planes 0-3, and plane 14's tags and
# variation selectors.  Planes 4-13 are unassigned, 15-16 private use.
_PLANES = (range(0x80, 0x40000), range(0xE0000, 0xE1000))


def _by_category(char: str) -> str:
    category = unicodedata.category(char)
    if category in _DROPPED:
        return ""
    if category == "Nd":
        return str(unicodedata.decimal(char))
    if category in ("Zs", "Zl", "Zp"):
        return " "
    if category == "Pd":
        return "-"
    return char


def _folded(char: str) -> str:
    by_category = _by_category(char)
    if by_category != char or unicodedata.is_normalized("NFKC", char):
        return by_category
    return "".join(_by_category(c) for c in unicodedata.normalize("NFKC", char))


_fold_char = lru_cache(maxsize=4096)(_folded)


@cache
def _foldable() -> re.Pattern[str]:
    """One character that folds to something else (built once, in about 0.1 s)."""
    ranges: list[tuple[int, int]] = []
    for plane in _PLANES:
        for point in plane:
            char = chr(point)
            if _folded(char) != char:
                if ranges and ranges[-1][1] == point - 1:
                    ranges[-1] = (ranges[-1][0], point)
                else:
                    ranges.append((point, point))
    members = "".join(
        f"\\U{low:08x}" if low == high else f"\\U{low:08x}-\\U{high:08x}" for low, high in ranges
    )
    return re.compile(f"[{members}]")


def prepare() -> None:
    """Build the table of characters that fold now rather than on the first text that
    needs it (a scanner does this when it is made)."""
    _foldable()


@dataclass(frozen=True, slots=True)
class Folded:
    """Folded text and how to find the original characters of a span of it."""

    text: str
    _starts: tuple[int, ...]
    """Where in ``text`` each folded character's replacement starts."""
    _marks: tuple[tuple[int, int, int], ...]
    """(start in ``text``, length of the replacement, index in the original), in order."""

    def original(self, start: int, end: int) -> tuple[int, int]:
        """The span of the original text that ``text[start:end]`` (not empty) came from."""
        return self._source(start), self._source(end - 1) + 1

    def _source(self, position: int) -> int:
        at = bisect_right(self._starts, position) - 1
        if at < 0:
            return position
        start, length, index = self._marks[at]
        if position < start + length:
            return index
        return index + 1 + position - start - length


def needs_folding(text: str) -> bool:
    """Whether ``fold`` would change ``text``."""
    return not text.isascii() and _foldable().search(text) is not None


def fold(text: str) -> Folded | None:
    """``text`` folded, or ``None`` if folding would not change it."""
    if text.isascii():
        return None
    pieces: list[str] = []
    marks: list[tuple[int, int, int]] = []
    done = length = 0
    for found in _foldable().finditer(text):
        index = found.start()
        pieces.append(text[done:index])
        length += index - done
        replacement = _fold_char(found.group())
        marks.append((length, len(replacement), index))
        pieces.append(replacement)
        length += len(replacement)
        done = index + 1
    if not marks:
        return None
    pieces.append(text[done:])
    return Folded("".join(pieces), tuple(m[0] for m in marks), tuple(marks))
