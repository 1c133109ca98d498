"""Where a finding is: a JSON path from the payload down, such as ``payload.items[2].note``.

A container's place is kept as a chain of ``Place`` tuples while the payload is walked;
the text of a path is only made for a finding.  Keys are shown as they read once redacted
(``Place.shown``), so a key that holds a secret never appears in a path.
"""

from __future__ import annotations

import json
import re
from typing import Any

ROOT = "payload"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

Place = tuple[Any, Any, Any, Any]
"""A container's place: (the parent's ``Place`` or ``None`` at the top, the parent, the
key or index there, the key as shown in paths)."""


def segment(shown: object) -> str:
    """``.name``, ``[2]``, or ``["odd key"]`` (JSON, ASCII: paths go into headers)."""
    if type(shown) is int:
        return f"[{shown}]"
    text = str(shown)
    if _IDENTIFIER.match(text):
        return f".{text}"
    return f"[{json.dumps(text)}]"


def path(place: Place | None, shown: object = None) -> str:
    """The path of the item ``shown`` inside the container at ``place`` (``None``: the
    top), or of that container itself when ``shown`` is ``None``."""
    parts = [] if shown is None else [segment(shown)]
    while place is not None:
        parts.append(segment(place[3]))
        place = place[0]
    return ROOT + "".join(reversed(parts))
