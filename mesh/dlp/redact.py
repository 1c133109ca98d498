"""Masks, and the redacted copy of a payload: the same shape, with masked text in place.

Cards, IBANs, SSNs and phone numbers keep their last four characters and their separators
(``**** **** **** 1111``), as receipts and statements show them; everything else becomes
``[redacted:<kind>]``.  The payload is never changed: the copy shares every container that
holds nothing redacted, and copies the ones on the way down to a change.
"""

from __future__ import annotations

import string
from typing import Any

from mesh.dlp.kinds import LAST_FOUR
from mesh.dlp.paths import Place

# What those kinds are made of is ASCII (their patterns say so); separators stay.
_STARS = str.maketrans(dict.fromkeys(string.ascii_letters + string.digits, "*"))
Piece = tuple[str, int, int, str]
"""A span to mask: (kind, start, end in the original text, the span's folded text)."""


def mask(kind: str, shown: str) -> str:
    """What replaces a finding of ``kind`` whose folded text is ``shown``."""
    if kind not in LAST_FOUR:
        return f"[redacted:{kind}]"
    cut, keep = len(shown), 4
    while keep and cut:
        cut -= 1
        keep -= shown[cut].isalnum()
    return shown[:cut].translate(_STARS) + shown[cut:]


def masked(text: str, pieces: list[Piece]) -> str:
    """``text`` with each piece masked; pieces that overlap are masked as one, whole."""
    if len(pieces) == 1:
        kind, start, end, shown = pieces[0]
        return text[:start] + mask(kind, shown) + text[end:]
    merged: list[Piece] = []
    for piece in sorted(pieces, key=lambda p: (p[1], -p[2])):
        if merged and piece[1] < merged[-1][2]:
            kind, start, end, _ = merged[-1]
            merged[-1] = (kind, start, max(end, piece[2]), "")
        else:
            merged.append(piece)
    out = []
    done = 0
    for kind, start, end, shown in merged:
        out.append(text[done:start])
        out.append(mask(kind, shown) if shown else f"[redacted:{kind}]")
        done = end
    out.append(text[done:])
    return "".join(out)


class Copy:
    """The redacted copy of one payload, built from changes at places in it."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload
        self._copies: dict[int, Any] = {}
        self._renames: dict[int, tuple[Any, Place | None, dict[str, str]]] = {}

    def set(self, container: Any, place: Place | None, key: Any, value: Any) -> None:
        """Put ``value`` at ``key`` of ``container`` (at ``place``) in the copy; a
        ``container`` of ``None`` replaces the whole payload."""
        if container is None:
            self.payload = value
        else:
            self._copy(container, place)[key] = value

    def rename(self, container: dict[str, Any], place: Place | None, key: str, new: str) -> None:
        """Rename ``key`` of the dict ``container`` in the copy (done last, in ``result``,
        so that changes below it can still find it by its old name)."""
        entry = self._renames.setdefault(id(container), (container, place, {}))
        entry[2][key] = new

    def result(self) -> Any:
        for container, place, names in self._renames.values():
            copy = self._copy(container, place)
            items = [(names.get(k, k), v) for k, v in copy.items()]
            copy.clear()
            copy.update(items)
        return self.payload

    def _copy(self, container: Any, place: Place | None) -> Any:
        # Copies the chain from the top down to ``container``, each hung into its copied
        # parent; iterative, so that no payload is too deep for it.
        chain = []
        while id(container) not in self._copies:
            chain.append((container, place))
            if place is None:
                break
            place, container = place[0], place[1]
        for original, where in reversed(chain):
            copy = dict(original) if type(original) is dict else list(original)
            self._copies[id(original)] = copy
            if where is None:
                self.payload = copy
            else:
                self._copies[id(where[1])][where[2]] = copy
        return self._copies[id(chain[0][0]) if chain else id(container)]
