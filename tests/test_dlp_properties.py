"""DLP properties over generated input: scanning never raises and redaction keeps the shape,
whatever the JSON; a card number written with any separators and evasions is found and
leaves none of its masked digits behind.  Pure logic: no broker, no Redis."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from mesh.dlp import DETECTORS, DlpRuleSpec, Scanner

REDACT = Scanner([DlpRuleSpec(detect=list(DETECTORS), action="redact")])

# Text with what scanners trip over: digits, separators, key words, invisible characters,
# fullwidth forms, and anything else Unicode has.
pieces = st.sampled_from(
    ["4111", " ", "-", ".", "@", "+", "=", ":", "AKIA", "eyJ", "Bearer ", "api_key", "GB82",
     "\u200b", "\u00ad", "\ufeff", "\uff14", "\u0301", "-----BEGIN PRIVATE KEY-----", "(", ")"]
)  # fmt: skip
texts = st.one_of(
    st.text(max_size=40), st.lists(pieces | st.text(max_size=3), max_size=12).map("".join)
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False)
    | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=20,
)


def shape(value: Any) -> Any:
    """Containers and their sizes, and where strings or redacted values may be."""
    if isinstance(value, dict):
        return ("dict", len(value), sorted((shape(v) for v in value.values()), key=repr))
    if isinstance(value, list):
        return ("list", [shape(v) for v in value])
    return "leaf"


@hypothesis_settings(max_examples=150, deadline=None)
@given(json_values)
def test_any_json_scans_and_keeps_its_shape(value: Any) -> None:
    result = REDACT.scan(value)
    assert shape(result.redacted) == shape(value)
    json.dumps(result.redacted)
    paths = [f.path for f in result.findings if f.action == "redact"]
    assert set(result.redacted_paths) <= set(paths)


def card_numbers() -> st.SearchStrategy[str]:
    """Valid Visa numbers of 16 digits: 4, 14 random digits, the Luhn check digit."""

    def complete(body: str) -> str:
        total = 0
        for i, char in enumerate(reversed(body)):
            digit = int(char) * (2 if i % 2 == 0 else 1)
            total += digit - 9 if digit > 9 else digit
        return body + str(-total % 10)

    return st.text("0123456789", min_size=14, max_size=14).map(lambda d: complete("4" + d))


SEPARATORS = ["", " ", "-", ".", "\u200b", "\u00ad", "\u2013", " - "]
FULLWIDTH = {ord("0") + d: 0xFF10 + d for d in range(10)}
words = st.text("abcdefghij ,;!?", max_size=20)


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    card_numbers(),
    st.lists(st.sampled_from(SEPARATORS), min_size=15, max_size=15),
    st.booleans(),
    words,
    words,
)
def test_found_cards_leave_no_masked_digit(
    number: str, separators: list[str], fullwidth: bool, before: str, after: str
) -> None:
    written = "".join(d + s for d, s in zip(number, [*separators, ""], strict=True))
    if fullwidth:
        written = written.translate(FULLWIDTH)
    result = REDACT.scan({"note": f"{before} {written} {after}"})
    assert [f.kind for f in result.findings] == ["card"]
    redacted = result.redacted["note"]
    digits = "".join(re.findall("[0-9]", redacted))
    assert digits == number[-4:]
    assert redacted.startswith(f"{before} ") and redacted.endswith(f" {after}")
