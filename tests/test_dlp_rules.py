"""DLP rules as the policy file states them: what they accept, and errors that name the bad
value.  Pure logic: no broker, no Redis."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mesh.dlp import DEFAULT_MAX_BYTES, DlpRuleSpec, DlpSpec


def error(data: object, model: type[DlpRuleSpec] | type[DlpSpec] = DlpRuleSpec) -> str:
    with pytest.raises(ValidationError) as raised:
        model.model_validate(data)
    return str(raised.value)


def test_accepted_forms() -> None:
    one = DlpRuleSpec.model_validate({"detect": "card", "action": "block"})
    assert (one.detect, one.topics, one.kinds) == (["card"], ["#"], ("card",))
    many = DlpRuleSpec.model_validate(
        {"detect": ["iban", "ssn"], "action": "redact", "topics": "payments.#"}
    )
    assert (many.kinds, many.topics) == (("iban", "ssn"), ["payments.#"])
    custom = DlpRuleSpec.model_validate({"pattern": "EMP-[0-9]{6}", "action": "alert"})
    assert custom.kinds == ("custom",)
    named = DlpRuleSpec.model_validate(
        {"pattern": "(?i)emp-[0-9]{6}", "name": "employee_id", "action": "alert"}
    )
    assert named.kinds == ("employee_id",)
    spec = DlpSpec.model_validate({"rules": [{"detect": "email", "action": "alert"}]})
    assert spec.max_payload_bytes == DEFAULT_MAX_BYTES and len(spec.rules) == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"detector": "card", "action": "block"}, "unknown key 'detector' (expected detect,"),
        ({"detect": "crad", "action": "block"}, "unknown detector 'crad' (expected card, iban,"),
        ({"detect": ["card", "ibn"], "action": "block"}, "unknown detector 'ibn'"),
        (
            {"detect": "card", "action": "blok"},
            "unknown action 'blok' (expected block, redact, alert)",
        ),
        ({"detect": "card"}, "action\n  Field required"),
        ({"action": "block"}, "either detect: DETECTOR(S) or pattern: REGEX"),
        ({"detect": "card", "pattern": "x+", "action": "block"}, "either detect:"),
        ({"detect": [], "action": "block"}, "detect: names no detector"),
        ({"pattern": "(", "action": "block"}, "bad pattern '(': missing ), unterminated"),
        (
            {"pattern": "(?P<id>[0-9]+)", "action": "block"},
            "pattern '(?P<id>[0-9]+)' names a group",
        ),
        ({"pattern": r"(a)\1", "action": "block"}, "refers back to a group"),
        ({"pattern": "(a)?(?(1)b|c)", "action": "block"}, "refers back to a group"),
        ({"pattern": "x*", "action": "block"}, "pattern 'x*' matches empty text"),
        ({"pattern": r"\b", "action": "block"}, "matches empty text"),
        ({"pattern": "(?=1)", "action": "block"}, "matches empty text"),
        ({"pattern": "x", "name": "Bad Name", "action": "block"}, "name 'Bad Name' must be"),
        ({"pattern": "x", "name": "email", "action": "block"}, "name 'email' is a built-in"),
        ({"detect": "card", "name": "cards", "action": "block"}, "name: is for pattern rules"),
        ({"detect": "card", "action": "block", "topics": "a..b"}, "invalid pattern 'a..b'"),
        ({"detect": "card", "action": "block", "topics": "_req.#"}, "belong to the mesh"),
        ({"detect": "card", "action": "block", "topics": []}, "topics: names no pattern"),
    ],
)
def test_rule_errors(data: object, message: str) -> None:
    assert message in error(data)


def test_spec_errors() -> None:
    assert "max_payload_bytes 0 must be at least 1" in error({"max_payload_bytes": 0}, DlpSpec)
    assert "unknown key 'rule'" in error({"rule": []}, DlpSpec)
    assert "unknown detector 'crad'" in error(
        {"rules": [{"detect": "crad", "action": "alert"}]}, DlpSpec
    )
