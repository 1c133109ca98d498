"""DLP against trivial evasions: compatibility forms, invisible characters, other scripts'
digits, Unicode dashes and spaces, separators inside numbers; and that redaction masks
exactly the original characters.  Pure logic: no broker, no Redis."""

from __future__ import annotations

import json

import pytest

from mesh.dlp import DETECTORS, DlpRuleSpec, Scanner
from mesh.dlp.fold import fold

REDACT = Scanner([DlpRuleSpec(detect=list(DETECTORS), action="redact")])

FULLWIDTH = {c: c + 0xFEE0 for c in range(0x21, 0x7F)}  # ASCII's fullwidth forms
ARABIC_INDIC = {ord("0") + d: 0x660 + d for d in range(10)}


def wide(text: str) -> str:
    return text.translate(FULLWIDTH)


ZWSP, ZWJ, SHY, BOM, WORD_JOINER = "\u200b", "\u200d", "\u00ad", "\ufeff", "\u2060"


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("card", wide("4111 1111 1111 1111")),
        ("card", ZWSP.join("4111111111111111")),
        ("card", "4111" + ZWJ + "1111" + SHY + "1111" + BOM + "1111"),
        ("card", "4111.1111.1111.1111"),
        ("card", "4111-1111-1111-1111"),
        ("card", "4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"),
        ("card", "4111\u20131111\u20131111\u20131111"),  # en dashes
        ("card", "4111\u00a01111\u202f1111\u30001111"),  # no-break, thin, ideographic spaces
        ("card", "4111111111111111".translate(ARABIC_INDIC)),
        ("card", wide("4111 1111 1111 1111").replace(" ", ZWJ)),
        ("card", "4\u03011\u03011\u03011111111111111"),  # combining marks
        ("iban", "GB82-WEST-1234-5698-7654-32"),
        ("iban", "gb82 west 1234 5698 7654 32"),
        ("iban", wide("GB82 WEST 1234 5698 7654 32")),
        ("iban", "DE89" + SHY + "3704" + SHY + "0044" + SHY + "0532" + SHY + "0130" + SHY + "00"),
        ("ssn", "078 05 1120"),
        ("ssn", "078.05.1120"),
        ("ssn", BOM + "078-05-1120"),
        ("ssn", wide("078-05-1120")),
        ("ssn", "0 7 8 0 5 1 1 2 0"),
        ("email", "ana" + SHY + ".lima@example" + ZWSP + ".com"),
        ("email", wide("ana@example.com")),
        ("phone", wide("+1 415 555 2671")),
        ("phone", wide("+") + "44 20 7946 0958"),
        ("aws_access_key", "AKIA" + WORD_JOINER + "IOSFODNN7EXAMPLE"),
        ("aws_access_key", wide("AKIAIOSFODNN7EXAMPLE")),
        ("aws_access_key", "AKIA\U000e0020IOSFODNN7EXAMPLE"),  # a tag character
    ],
)
def test_evasion_found_and_masked(kind: str, text: str) -> None:
    result = REDACT.scan({"note": f"see {text} here"})
    assert [f.kind for f in result.findings] == [kind]
    redacted = result.redacted["note"]
    assert redacted.startswith("see ") and redacted.endswith(" here")
    # The value is gone, evasion characters and all: nothing is left to fold back into it.
    assert not REDACT.scan(result.redacted).findings


def test_fold_maps_spans_back() -> None:
    text = "id " + wide("4111 1111") + ZWSP + "ok"
    folded = fold(text)
    assert folded is not None
    assert folded.text == "id 4111 1111ok"
    start = folded.text.index("4")
    assert folded.original(start, start + 9) == (3, 12)
    assert folded.original(start + 9, start + 11) == (13, 15)  # after the zero-width space
    assert fold("plain ascii") is None
    assert fold("São Paulo, Zürich") is None  # nothing to fold


def test_redaction_keeps_the_rest_of_the_text_as_it_was() -> None:
    text = "Zürich \u2603 " + wide("4111 1111 1111 1111") + " \ufb01n"
    result = REDACT.scan([text])
    assert result.redacted == ["Zürich \u2603 **** **** **** 1111 \ufb01n"]


def test_invisible_characters_do_not_hide_key_words() -> None:
    result = REDACT.scan(
        {
            wide("api") + ZWSP + wide("_key"): "Zx9Kq2Lm8Np4Rt6V",
            "note": "pass" + SHY + "word=Zx9Kq2Lm8Np4Rt6V",
            wide("ssn"): "536904399",
        }
    )
    assert sorted((f.kind, f.path) for f in result.findings) == [
        ("secret", "payload.note"),
        ("secret", f"payload[{json.dumps(wide('api') + ZWSP + wide('_key'))}]"),
        ("ssn", f"payload[{json.dumps(wide('ssn'))}]"),
    ]
