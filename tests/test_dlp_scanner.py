"""The DLP scanner: JSON paths, keys, actions, redaction (shape, last four), topics, pattern
rules, the size limit, and that no value ever shows in a finding, repr or error.  Pure
logic: no broker, no Redis."""

from __future__ import annotations

import copy
import json

import pytest

from mesh.dlp import (
    DETECTORS,
    DlpRuleSpec,
    DlpSpec,
    Finding,
    PayloadTooLarge,
    Scanner,
)

CARD = "4111 1111 1111 1111"
IBAN = "GB82 WEST 1234 5698 7654 32"
SSN = "078-05-1120"
PHONE = "+1 (415) 555-2671"
EMAIL = "ana.lima@example.com"
AWS = "AKIAIOSFODNN7EXAMPLE"


def scanner(action: str = "redact", **rule: object) -> Scanner:
    return Scanner(
        [DlpRuleSpec.model_validate({"detect": list(DETECTORS), "action": action, **rule})]
    )


def found(result: object) -> list[tuple[str, str]]:
    return [(f.kind, f.path) for f in result.findings]  # type: ignore[attr-defined]


def test_paths_through_nested_containers() -> None:
    payload = {
        "order": {"items": [{"note": "ok"}, {}, {"note": f"card {CARD}", "qty": 2}]},
        "first name": EMAIL,
        "tags": [["a", SSN]],
    }
    result = scanner("alert").scan(payload)
    assert sorted(found(result)) == [
        ("card", "payload.order.items[2].note"),
        ("email", 'payload["first name"]'),
        ("ssn", "payload.tags[0][1]"),
    ]


def test_top_level_values() -> None:
    assert found(scanner().scan(EMAIL)) == [("email", "payload")]
    assert scanner().scan(EMAIL).redacted == "[redacted:email]"
    assert found(scanner().scan([CARD])) == [("card", "payload[0]")]
    assert found(scanner().scan(4111111111111111)) == [("card", "payload")]
    nothing: object
    for nothing in (None, True, 1.5, 12, "", [], {}, 10**5000, [-(10**5000)]):
        assert scanner().scan(nothing).findings == ()


def test_keys_are_scanned_and_never_shown() -> None:
    payload = {"contacts": {EMAIL: {"phone": PHONE}, "bob@example.org": 1}}
    result = scanner().scan(payload)
    assert sorted(found(result)) == [
        ("email", 'payload.contacts["[redacted:email]"]'),
        ("email", 'payload.contacts["[redacted:email]~2"]'),
        ("phone", 'payload.contacts["[redacted:email]"].phone'),
    ]
    assert result.redacted == {
        "contacts": {"[redacted:email]": {"phone": "+* (***) ***-2671"}, "[redacted:email]~2": 1}
    }
    assert list(result.redacted_paths) == [
        'payload.contacts["[redacted:email]"]',
        'payload.contacts["[redacted:email]~2"]',
        'payload.contacts["[redacted:email]"].phone',
    ]
    # Alerted, the key stays in the payload but paths still hide it.
    alerted = scanner("alert").scan(payload)
    assert alerted.redacted is payload
    assert EMAIL not in repr(alerted.findings)


def test_redaction_keeps_shape_and_last_four() -> None:
    payload = {
        "card": CARD,
        "iban": IBAN,
        "ssn": SSN,
        "phone": PHONE,
        "email": EMAIL,
        "key": f"id {AWS} end",
        "numbers": [4111111111111111, 7, 2.5, None, True],
        "clean": {"a": [1, "two", {"three": 3.0}]},
    }
    original = copy.deepcopy(payload)
    result = scanner().scan(payload)
    assert payload == original  # the payload itself is never changed
    assert result.redacted == {
        "card": "**** **** **** 1111",
        "iban": "**** **** **** **** **54 32",
        "ssn": "***-**-1120",
        "phone": "+* (***) ***-2671",
        "email": "[redacted:email]",
        "key": "id [redacted:aws_access_key] end",
        "numbers": ["************1111", 7, 2.5, None, True],
        "clean": {"a": [1, "two", {"three": 3.0}]},
    }
    assert result.redacted["clean"] is payload["clean"]  # untouched parts are shared
    assert json.loads(json.dumps(result.redacted)) == result.redacted
    assert set(result.redacted_paths) == {
        "payload.card",
        "payload.iban",
        "payload.ssn",
        "payload.phone",
        "payload.email",
        "payload.key",
        "payload.numbers[0]",
    }


def test_several_findings_in_one_string() -> None:
    text = f"{EMAIL} / {CARD} / {EMAIL.upper()}"
    result = scanner().scan({"note": text})
    assert sorted(found(result)) == [("card", "payload.note"), ("email", "payload.note")]
    assert result.redacted == {"note": "[redacted:email] / **** **** **** 1111 / [redacted:email]"}
    assert result.redacted_paths == ("payload.note",)


def test_actions() -> None:
    payload = {"card": CARD, "mail": EMAIL, "key": AWS}
    rules = [
        DlpRuleSpec(detect=["card"], action="redact"),
        DlpRuleSpec(detect=["email"], action="alert"),
        DlpRuleSpec(detect=["aws_access_key"], action="block"),
    ]
    result = Scanner(rules).scan(payload)
    assert sorted((f.kind, f.action, f.rule) for f in result.findings) == [
        ("aws_access_key", "block", 2),
        ("card", "redact", 0),
        ("email", "alert", 1),
    ]
    assert result.blocked
    assert result.redacted == {"card": "**** **** **** 1111", "mail": EMAIL, "key": AWS}
    assert result.redacted_paths == ("payload.card",)
    passing = Scanner(rules[:2]).scan(payload)
    assert not passing.blocked
    clean = Scanner(rules).scan({"note": "nothing here"})
    assert clean == type(clean)((), {"note": "nothing here"}, (), False)


def test_strongest_action_wins_and_names_its_rule() -> None:
    rules = [
        DlpRuleSpec(detect=["card", "iban"], action="alert"),
        DlpRuleSpec(detect=["card"], action="block", topics=["payments.#"]),
        DlpRuleSpec(detect=["card"], action="redact"),
    ]
    scan = Scanner(rules).scan
    assert scan({"c": CARD}, topic="payments.eu").findings == (
        Finding("card", "payload.c", "block", 1),
    )
    assert scan({"c": CARD}, topic="vehicle.v7").findings == (
        Finding("card", "payload.c", "redact", 2),
    )
    assert scan({"i": IBAN}, topic="vehicle.v7").findings == (
        Finding("iban", "payload.i", "alert", 0),
    )


def test_topics() -> None:
    rules = [
        DlpRuleSpec(detect=["card"], action="block", topics=["payments.#", "shop.*.orders"]),
        DlpRuleSpec(detect=["email"], action="alert", topics=["crm.#"]),
    ]
    scan = Scanner(rules).scan
    payload = {"card": CARD, "mail": EMAIL}
    assert [f.kind for f in scan(payload, topic="payments.card.v1").findings] == ["card"]
    assert [f.kind for f in scan(payload, topic="shop.eu.orders").findings] == ["card"]
    assert [f.kind for f in scan(payload, topic="crm.contacts").findings] == ["email"]
    assert scan(payload, topic="vehicle.v7.speed").findings == ()
    assert {f.kind for f in scan(payload).findings} == {"card", "email"}  # every rule


def test_pattern_rules() -> None:
    rules = [
        DlpRuleSpec(pattern=r"EMP-[0-9]{6}", name="employee_id", action="redact"),
        DlpRuleSpec(pattern=r"(?i)project (falcon|osprey)", action="block", topics=["internal.#"]),
        DlpRuleSpec(detect=["email"], action="redact"),
    ]
    scan = Scanner(rules).scan
    result = scan({"note": f"EMP-123456 wrote from {EMAIL}"}, topic="hr.notes")
    assert sorted((f.kind, f.rule) for f in result.findings) == [("email", 2), ("employee_id", 0)]
    assert result.redacted == {"note": "[redacted:employee_id] wrote from [redacted:email]"}
    secret = scan({"EMP-654321": "PROJECT Osprey"}, topic="internal.plans")
    assert sorted((f.kind, f.path, f.action) for f in secret.findings) == [
        ("custom", 'payload["[redacted:employee_id]"]', "block"),
        ("employee_id", 'payload["[redacted:employee_id]"]', "redact"),
    ]
    assert secret.blocked
    assert scan({"note": "EMP-12345"}).findings == ()  # five digits: no match


def test_pattern_rules_read_folded_text() -> None:
    result = Scanner([DlpRuleSpec(pattern="EMP-[0-9]{6}", action="redact")]).scan(
        ["".join(chr(ord(c) + 0xFEE0) for c in "EMP-123") + "\u200b\uff14\uff15\uff16 ok"]
    )
    assert result.redacted == ["[redacted:custom] ok"]


def test_size_limit() -> None:
    small = Scanner(max_bytes=100)
    small.check_size(b"x" * 100)
    body = b'{"card": "4111111111111111"' + b" " * 100 + b"}"
    with pytest.raises(PayloadTooLarge) as refused:
        small.check_size(body)
    assert str(refused.value) == "payload of 128 bytes is over the DLP limit of 100 bytes"
    assert (refused.value.size, refused.value.limit) == (len(body), 100)
    assert "4111" not in str(refused.value) and "4111" not in repr(refused.value)
    spec = DlpSpec(max_payload_bytes=10, rules=[DlpRuleSpec(detect=["card"], action="block")])
    from_spec = Scanner.from_spec(spec)
    assert from_spec.max_bytes == 10 and len(from_spec.rules) == 1
    with pytest.raises(PayloadTooLarge, match="11 bytes is over the DLP limit of 10 bytes"):
        from_spec.check_size(b"x" * 11)


SECRETS = {
    "card": CARD,
    "iban": IBAN,
    "ssn": SSN,
    "phone": PHONE,
    "email": EMAIL,
    "aws": AWS,
    "password": "Tr0ub4dor&3xyzzy",
    "auth": "Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0",
}


@pytest.mark.parametrize("action", ["alert", "block", "redact"])
def test_no_value_in_findings_or_reprs(action: str) -> None:
    # As keys too, but for the password: without its key word it is just a word.
    keys = {value: 1 for name, value in SECRETS.items() if name != "password"}
    scan = scanner(action)
    result = scan.scan({**SECRETS, "as_keys": keys})
    assert len(result.findings) == len(SECRETS) + len(keys)
    shown = " ".join([repr(result), str(result), repr(scan), *(repr(f) for f in result.findings)])
    for value in SECRETS.values():
        for part in value.split():
            if len(part) > 4 and part != "Bearer":
                assert part not in shown, part


def test_key_words_flag_values_but_not_their_paths() -> None:
    result = scanner().scan({"credentials": {"api_key": "sk_live_51HqLyjWDarjtT1zdp7dc"}})
    assert found(result) == [("secret", "payload.credentials.api_key")]
    assert result.redacted == {"credentials": {"api_key": "[redacted:secret]"}}


def test_caches_do_not_carry_findings_between_payloads() -> None:
    scan = scanner().scan
    assert found(scan({EMAIL: 1})) == [("email", 'payload["[redacted:email]"]')]
    assert found(scan({EMAIL: 1})) == [("email", 'payload["[redacted:email]"]')]
    assert found(scan({"plain": 1})) == []
    assert found(scan({"plain": EMAIL})) == [("email", "payload.plain")]


def test_deep_payloads() -> None:
    deep: object = CARD
    for _ in range(5000):
        deep = [deep]
    result = scanner().scan(deep)
    assert found(result) == [("card", "payload" + "[0]" * 5000)]
    inner = result.redacted
    for _ in range(5000):
        inner = inner[0]
    assert inner == "**** **** **** 1111"


def test_without_rules_nothing_is_found() -> None:
    assert Scanner().scan(SECRETS).findings == ()
