"""Payload schemas in the policy: sources, versions, requirements, checks, reasons that show
no values, and load errors with their lines.

Pure logic: no broker, no Redis.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from payloads import Reading

from mesh.cli import main
from mesh.policy import PolicyError, load_policy, parse_policy
from mesh.policy.schemas import Expectation, PayloadSchemas, SchemaViolation, schema_id
from mesh.policy.violations import REASON_CHARS, json_path

PRINCIPALS = "principals:\n  vehicles: {kind: agent, agents: ['v[0-9]*']}\n"

SCHEMAS = PRINCIPALS + textwrap.dedent(
    """\
    schemas:
      definitions:
        reading:
          - version: 1
            inline:
              type: object
              properties:
                vehicle: {type: string}
                speed_kmh: {type: number}
              required: [vehicle, speed_kmh]
          - version: 2
            model: payloads:Reading
        status:
          - version: 1
            inline: {type: object, additionalProperties: false}
      payloads:
        - topics: "vehicle.*.speed"
          accept: [reading@1, reading@2]
        - topics: ["fleet.#", "depot.*"]
          accept: reading@2
        - request: {agent: "v[0-9]*", operation: status}
          accept: status
      require: ["vehicle.#", "_req.*.config"]
    """
)


@pytest.fixture(scope="module")
def schemas() -> PayloadSchemas:
    return parse_policy(SCHEMAS).schemas


def expect(schemas: PayloadSchemas, key: str) -> Expectation:
    expectation = schemas.expectation(key)
    assert expectation is not None, key
    return expectation


def check(schemas: PayloadSchemas, key: str, named: str | None, payload: Any) -> str:
    """The schema id the message passed with."""
    return expect(schemas, key).check(named, json.dumps(payload).encode()).id


def refusal(schemas: PayloadSchemas, key: str, named: str | None, payload: Any) -> str:
    with pytest.raises(SchemaViolation) as caught:
        check(schemas, key, named, payload)
    return str(caught.value)


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    return caught.value.lines()


# Checking messages


def test_a_valid_payload_passes_with_the_version_it_names(schemas: PayloadSchemas) -> None:
    reading = {"vehicle": "v7", "speed_kmh": 88.5}
    assert check(schemas, "vehicle.v7.speed", "reading@1", reading) == "reading@1"
    assert check(schemas, "vehicle.v7.speed", "reading@2", reading) == "reading@2"


def test_an_invalid_payload_is_refused_with_its_path_and_reason(schemas: PayloadSchemas) -> None:
    reason = refusal(
        schemas, "vehicle.v7.speed", "reading@1", {"vehicle": "v7", "speed_kmh": "fast"}
    )
    assert reason == "payload.speed_kmh: a string is not of type 'number' (reading@1)"
    reason = refusal(schemas, "vehicle.v7.speed", "reading@1", {"vehicle": "v7"})
    assert reason == "payload: required property 'speed_kmh' is missing (reading@1)"


def test_each_version_is_checked_against_its_own_schema(schemas: PayloadSchemas) -> None:
    # Version 2 (the pydantic model) bounds the speed; version 1 does not.
    fast = {"vehicle": "v7", "speed_kmh": 500}
    assert check(schemas, "vehicle.v7.speed", "reading@1", fast) == "reading@1"
    assert refusal(schemas, "vehicle.v7.speed", "reading@2", fast) == (
        "payload.speed_kmh: a number is greater than the maximum of 400 (reading@2)"
    )


def test_a_message_naming_no_schema_or_another_version_is_refused_naming_what_is_accepted(
    schemas: PayloadSchemas,
) -> None:
    reading = {"vehicle": "v7", "speed_kmh": 1}
    assert refusal(schemas, "vehicle.v7.speed", None, reading) == (
        "the message names no schema (x-mesh-schema); 'vehicle.v7.speed' accepts "
        "reading@1, reading@2"
    )
    assert refusal(schemas, "vehicle.v7.speed", "reading@3", reading) == (
        "x-mesh-schema 'reading@3' is not accepted on 'vehicle.v7.speed' "
        "(accepted: reading@1, reading@2)"
    )
    assert refusal(schemas, "fleet.north.count", "reading@1", reading) == (
        "x-mesh-schema 'reading@1' is not accepted on 'fleet.north.count' (accepted: reading@2)"
    )
    # What a sender names is shown shortened: it is the sender's text.
    long = refusal(schemas, "vehicle.v7.speed", "x" * 500, reading)
    assert len(long) < 200


def test_a_bare_schema_name_accepts_every_version(schemas: PayloadSchemas) -> None:
    status = expect(schemas, "_req.v7.status")
    assert list(status.accepted) == ["status@1"]
    assert check(schemas, "_req.v7.status", "status@1", {}) == "status@1"
    assert refusal(schemas, "_req.v7.status", "status@1", {"all": True}) == (
        "payload: unexpected property 'all' (status@1)"
    )


def test_a_body_that_is_not_json_is_refused(schemas: PayloadSchemas) -> None:
    with pytest.raises(SchemaViolation, match=r"the payload is not JSON \(reading@1\)"):
        expect(schemas, "vehicle.v7.speed").check("reading@1", b"{not json")


def test_topics_without_a_schema_pass_unless_one_is_required(schemas: PayloadSchemas) -> None:
    assert schemas.expectation("alerts.speeding.v7") is None
    assert schemas.expectation("_req.v7.reboot") is None
    assert refusal(schemas, "vehicle.v7.debug", "reading@1", {}) == (
        "the policy requires a schema on 'vehicle.v7.debug' (require: 'vehicle.#') and "
        "declares none for it"
    )
    assert refusal(schemas, "_req.v7.config", None, {}) == (
        "the policy requires a schema on '_req.v7.config' (require: '_req.*.config') and "
        "declares none for it"
    )


def test_the_mesh_own_keys_are_checked_only_where_patterns_name_them() -> None:
    compiled = parse_policy(
        PRINCIPALS
        + "schemas:\n"
        "  definitions:\n"
        "    join:\n"
        "      - {version: 1, inline: {type: object, required: [agent]}}\n"
        "  payloads:\n"
        "    - {topics: '_registry.join', accept: join}\n"
        "  require: ['#']\n"
    ).schemas
    assert compiled.expectation("_registry.leave") is None  # '#' is about user topics
    assert compiled.expectation("_ctl.v7.ping") is None
    assert compiled.expectation("_reply.v7.i1") is None
    assert compiled.expectation("_req.v7.status") is None
    assert refusal(compiled, "_registry.join", "join@1", {}) == (
        "payload: required property 'agent' is missing (join@1)"
    )
    # The mesh writes its registry events and control commands itself, naming no version:
    # its one version checks them.
    assert check(compiled, "_registry.join", None, {"agent": "v7"}) == "join@1"
    assert refusal(compiled, "_registry.join", None, {}) == (
        "payload: required property 'agent' is missing (join@1)"
    )
    assert compiled.expectation("anything.at.all") is not None


def test_requests_are_matched_by_agent_and_operation_globs(schemas: PayloadSchemas) -> None:
    assert expect(schemas, "_req.v12.status").rule is not None
    assert schemas.expectation("_req.monitor.status") is None
    assert schemas.expectation("_req.v7.statuses") is None


def test_lookups_and_validators_are_compiled_once(schemas: PayloadSchemas) -> None:
    first = schemas.expectation("vehicle.v7.speed")
    assert schemas.expectation("vehicle.v7.speed") is first
    assert first is not None
    assert first.accepted["reading@1"] is schemas.definitions["reading"][1]
    assert first.accepted["reading@1"].validator is schemas.definitions["reading"][1].validator


def test_formats_are_checked() -> None:
    compiled = parse_policy(
        PRINCIPALS
        + "schemas:\n"
        "  definitions:\n"
        "    event:\n"
        "      - version: 1\n"
        "        inline:\n"
        "          properties:\n"
        "            at: {type: string, format: date-time}\n"
        "            home: {type: string, format: uri}\n"
        "            mail: {type: string, format: email}\n"
        "  payloads:\n"
        "    - {topics: 'events.#', accept: event@1}\n"
    ).schemas
    good = {"at": "2024-05-01T12:00:00Z", "home": "https://example.org/x", "mail": "a@b.org"}
    assert check(compiled, "events.x", "event@1", good) == "event@1"
    for field, bad in [("at", "yesterday"), ("home", "not a uri"), ("mail", "nobody")]:
        assert refusal(compiled, "events.x", "event@1", {**good, field: bad}).startswith(
            f"payload.{field}: a string is not a valid "
        )


# Reasons never show the payload's values


SECRET = "4111-1111-1111-1111"


@pytest.mark.parametrize(
    ("schema", "payload", "reason"),
    [
        ({"type": "number"}, SECRET, "payload: a string is not of type 'number'"),
        (
            {"type": ["number", "null"]},
            SECRET,
            "payload: a string is not of type 'number' or 'null'",
        ),
        ({"pattern": "^[a-z]+$"}, SECRET, "payload: a string does not match '^[a-z]+$'"),
        ({"maxLength": 4}, SECRET, "payload: a string is longer than 4 characters"),
        ({"minLength": 40}, SECRET, "payload: a string is shorter than 40 characters"),
        ({"enum": ["a", "b"]}, SECRET, "payload: a string is not one of 'a', 'b'"),
        ({"const": "x"}, SECRET, "payload: a string is not 'x'"),
        ({"format": "email"}, SECRET, "payload: a string is not a valid 'email'"),
        ({"maximum": 10}, 41111111, "payload: a number is greater than the maximum of 10"),
        ({"multipleOf": 7}, 41111111, "payload: a number is not a multiple of 7"),
        ({"not": {"type": "string"}}, SECRET, "payload: a string matches the 'not' schema"),
        (
            {"items": {"type": "integer"}},
            [1, SECRET],
            "payload[1]: a string is not of type 'integer'",
        ),
        (
            {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
            SECRET,
            "payload: a string is longer than 3 characters",
        ),
        (
            {"oneOf": [{"type": "string"}, {"minLength": 1}]},
            SECRET,
            "payload: a string does not match exactly one of the 'oneOf' schemas",
        ),
        (
            {"propertyNames": {"maxLength": 3}},
            {"card": SECRET},
            "payload: a property name is longer than 3 characters",
        ),
        (
            {"dependentRequired": {"card": ["cvv"]}},
            {"card": SECRET},
            "payload: property 'cvv' is required when 'card' is present",
        ),
        (False, {"card": SECRET}, "payload: no value is allowed here"),
        (
            {"prefixItems": [{}], "items": False},
            [1, SECRET],
            "payload: an array has more items than the schema allows",
        ),
        (
            {"uniqueItems": True},
            [SECRET, SECRET],
            "payload: an array has repeated items",
        ),
        (
            {"type": "object", "unevaluatedProperties": False},
            {"card": SECRET},
            "payload: an object has properties the schema does not allow",
        ),
    ],
)
def test_a_reason_names_the_type_and_rule_never_the_value(
    schema: dict[str, Any] | bool, payload: Any, reason: str
) -> None:
    text = (
        PRINCIPALS
        + "schemas:\n  definitions:\n    s:\n      - version: 1\n        inline: "
        + json.dumps(schema)
        + "\n  payloads:\n    - {topics: 't', accept: s}\n"
    )
    got = refusal(parse_policy(text).schemas, "t", "s@1", payload)
    assert got == f"{reason} (s@1)"
    assert "4111" not in got


def test_paths_show_odd_and_long_property_names_shortened() -> None:
    assert json_path(["items", 2, "name"]) == "payload.items[2].name"
    assert json_path(["a b", "ünï"]) == "payload['a b']['ünï']"
    long = json_path(["k" * 100])
    assert long.startswith("payload['kkk") and long.endswith("…]") and len(long) < 50


def test_a_reason_is_cut_short() -> None:
    names = {f"unexpected_property_number_{i}": i for i in range(40)}
    text = (
        PRINCIPALS
        + "schemas:\n  definitions:\n    s:\n      - version: 1\n        inline: "
        + json.dumps({"additionalProperties": False})
        + "\n  payloads:\n    - {topics: 't', accept: s}\n"
    )
    got = refusal(parse_policy(text).schemas, "t", "s@1", names)
    assert "and 37 more" in got
    assert len(got) <= REASON_CHARS + len(" (s@1)")


# Sources


def test_a_pydantic_model_source_is_its_json_schema(schemas: PayloadSchemas) -> None:
    version = schemas.definitions["reading"][2]
    assert version.schema == Reading.model_json_schema()
    assert version.source == "model payloads:Reading"
    assert refusal(
        schemas, "vehicle.v7.speed", "reading@2", {"vehicle": "v7", "speed_kmh": 1, "at": "now"}
    ) == "payload.at: a string is not a valid 'date-time' (reading@2)"


def test_file_sources_are_relative_to_the_policy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "reading.json").write_text(
        json.dumps({"type": "object", "required": ["vehicle"]})
    )
    (tmp_path / "schemas" / "reading.yaml").write_text(
        "type: object\nrequired: [speed_kmh]\n"
    )
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        PRINCIPALS
        + "schemas:\n"
        "  definitions:\n"
        "    reading:\n"
        "      - {version: 1, file: schemas/reading.json}\n"
        "      - {version: 2, file: schemas/reading.yaml}\n"
        "  payloads:\n"
        "    - {topics: 'vehicle.*.speed', accept: reading}\n"
    )
    monkeypatch.chdir("/")
    compiled = load_policy(policy_file).schemas
    assert compiled.definitions["reading"][1].source == "file schemas/reading.json"
    assert refusal(compiled, "vehicle.v7.speed", "reading@1", {}) == (
        "payload: required property 'vehicle' is missing (reading@1)"
    )
    assert refusal(compiled, "vehicle.v7.speed", "reading@2", {}) == (
        "payload: required property 'speed_kmh' is missing (reading@2)"
    )


def test_schema_ids_are_name_at_version() -> None:
    assert schema_id("reading", 2) == "reading@2"


def test_a_policy_without_schemas_declares_none() -> None:
    assert not parse_policy(PRINCIPALS).schemas.declared
    assert parse_policy(SCHEMAS).schemas.declared


def test_policy_check_summarises_the_schemas(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(SCHEMAS)
    result = CliRunner().invoke(main, ["policy", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert (
        "schemas: 2 (3 versions), 3 payload entries; required on vehicle.#, _req.*.config"
        in result.stdout.splitlines()
    )


# Load errors: file, line, reason


def definitions(*versions: str, payloads: str = "") -> str:
    return (
        PRINCIPALS
        + "schemas:\n  definitions:\n    reading:\n"
        + "".join(f"      - {v}\n" for v in versions)
        + (f"  payloads:\n{payloads}" if payloads else "")
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            definitions("{version: 1, file: nowhere/reading.json}"),
            "policy.yaml:6: schema reading@1: file nowhere/reading.json does not exist",
            id="missing file",
        ),
        pytest.param(
            definitions("version: 1\n        inline:\n          type: object\n"
                        "          properties:\n            speed: {type: nmber}"),
            "policy.yaml:10: schema reading@1 (inline): not a valid JSON Schema at "
            "properties/speed/type: 'nmber' is not valid under any of the given schemas",
            id="invalid inline schema, at its line",
        ),
        pytest.param(
            definitions("{version: 1, inline: {minLength: -1}}"),
            "policy.yaml:6: schema reading@1 (inline): not a valid JSON Schema at minLength: "
            "-1 is less than the minimum of 0",
            id="invalid keyword value",
        ),
        pytest.param(
            definitions("{version: 1, inline: {$schema: 'http://json-schema.org/draft-07/schema#'}}"),
            "policy.yaml:6: schema reading@1 (inline): schemas are Draft 2020-12 "
            "(https://json-schema.org/draft/2020-12/schema), not 'http://json-schema.org/draft-0…",
            id="another draft",
        ),
        pytest.param(
            definitions("{version: 1, inline: {properties: {a: {$ref: '#/$defs/nope'}}}}"),
            "policy.yaml:6: schema reading@1 (inline): $ref '#/$defs/nope' at properties/a "
            "resolves to nothing: references reach within the schema only",
            id="unresolvable reference",
        ),
        pytest.param(
            definitions("{version: 1, inline: {$ref: 'https://example.org/reading.json'}}"),
            "policy.yaml:6: schema reading@1 (inline): $ref 'https://example.org/reading.json' "
            "at the top resolves to nothing: references reach within the schema only",
            id="remote reference",
        ),
        pytest.param(
            definitions("{version: 1, model: 'no_such_module_here:Reading'}"),
            "policy.yaml:6: schema reading@1: cannot import 'no_such_module_here': "
            "ModuleNotFoundError: No module named 'no_such_module_here'",
            id="model that does not import",
        ),
        pytest.param(
            definitions("{version: 1, model: 'payloads:Missing'}"),
            "policy.yaml:6: schema reading@1: module 'payloads' has no 'Missing'",
            id="model not in its module",
        ),
        pytest.param(
            definitions("{version: 1, model: 'payloads:NotAModel'}"),
            "policy.yaml:6: schema reading@1: 'payloads:NotAModel' is no pydantic model "
            "(a BaseModel subclass)",
            id="no pydantic model",
        ),
        pytest.param(
            definitions("{version: 1, model: 'payloads'}"),
            "policy.yaml:6: model 'payloads' is not of the form module:Model",
            id="model without a name",
        ),
        pytest.param(
            definitions("{version: 1, inline: {}, file: a.json}"),
            "policy.yaml:6: a schema version has one source: inline: {JSON Schema}, "
            "file: PATH or model: module:Model (got inline, file)",
            id="two sources",
        ),
        pytest.param(
            definitions("{version: 0, inline: {}}"),
            "policy.yaml:6: version 0 must be 1 or more",
            id="version 0",
        ),
        pytest.param(
            definitions("{version: 1, inline: [1]}"),
            "policy.yaml:6: a JSON Schema is a mapping or true/false, not [1]",
            id="inline not a schema",
        ),
        pytest.param(
            definitions("{version: 1, inline: {const: 2024-05-01}}"),
            "policy.yaml:6: schema reading@1: not JSON (Object of type date is not JSON "
            "serializable): quote dates and times",
            id="inline date",
        ),
        pytest.param(
            definitions("{version: 1, inline: {}}", "{version: 1, inline: {}}"),
            "policy.yaml:7: schema 'reading': version 1 declared twice (first at line 6)",
            id="version twice",
        ),
        pytest.param(
            definitions("{version: 1, inline: {}}",
                        payloads="    - {topics: 'a.#', accept: [reading@2]}\n"),
            "policy.yaml:8: schema 'reading' has no version 2 (versions: 1)",
            id="unknown version",
        ),
        pytest.param(
            definitions("{version: 1, inline: {}}",
                        payloads="    - {topics: 'a.#', accept: [speed]}\n"),
            "policy.yaml:8: unknown schema 'speed' (schemas: reading)",
            id="unknown schema",
        ),
        pytest.param(
            definitions("{version: 1, inline: {}}",
                        payloads="    - {topics: 'a.#', accept: [reading@v2]}\n"),
            "policy.yaml:8: 'reading@v2': the version after '@' is a number from 1 (reading@2)",
            id="bad schema id",
        ),
        pytest.param(
            definitions(
                "{version: 1, inline: {}}",
                payloads="    - {topics: 'a.#', accept: reading}\n"
                "    - {topics: 'a.*.b', accept: reading}\n",
            ),
            "policy.yaml:9: payload entry 2 (a.*.b): topics 'a.*.b' overlap 'a.#' of entry 1 "
            "(line 8): one routing key would have two entries; make them disjoint",
            id="overlapping topics",
        ),
        pytest.param(
            definitions(
                "{version: 1, inline: {}}",
                payloads="    - {request: {agent: 'v*', operation: status}, accept: reading}\n"
                "    - {request: {agent: 'v7'}, accept: reading}\n",
            ),
            "policy.yaml:9: payload entry 2 (requests to v7 operation *): its requests overlap "
            "those of entry 1 (line 8): one routing key would have two entries; make them "
            "disjoint",
            id="overlapping requests",
        ),
        pytest.param(
            definitions(
                "{version: 1, inline: {}}",
                payloads="    - {request: {agent: '{self}'}, accept: reading}\n",
            ),
            "policy.yaml:8: {self} stands for the acting agent in rules; schemas apply to all",
            id="self in a request entry",
        ),
        pytest.param(
            definitions(
                "{version: 1, inline: {}}",
                payloads="    - {topics: '_req.v7.status', accept: reading}\n",
            ),
            "policy.yaml:8: '_req.v7.status': requests take request: {agent: GLOB, operation: "
            "GLOB}, and replies are not checked (their routing key does not name the operation)",
            id="request as a topic",
        ),
        pytest.param(
            definitions(
                "{version: 1, inline: {}}",
                payloads="    - {topics: 'a.#', request: {agent: v7}, accept: reading}\n",
            ),
            "policy.yaml:8: a payload entry names topics: [patterns] or request: {agent: GLOB, "
            "operation: GLOB}, one of them",
            id="topics and request",
        ),
        pytest.param(
            definitions(
                "{version: 1, inline: {}}",
                "{version: 2, inline: {}}",
                payloads="    - {topics: '_ctl.*.start_behaviour', accept: reading}\n",
            ),
            "policy.yaml:9: '_ctl.*.start_behaviour': the mesh writes these messages itself and "
            "names no schema version, so the entry accepts exactly one",
            id="two versions for the mesh's own messages",
        ),
        pytest.param(
            PRINCIPALS + "schemas:\n  require: ['_reply.#']\n",
            "policy.yaml:4: '_reply.#': replies are not checked, so none can be required",
            id="reply required",
        ),
        pytest.param(
            PRINCIPALS + "schemas:\n  checks: []\n",
            "policy.yaml:4: unknown key 'checks' (expected definitions, payloads, require)",
            id="unknown key",
        ),
    ],
)
def test_a_bad_schema_section_names_file_line_and_reason(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_a_file_that_is_no_valid_schema_names_its_entry(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"type": "object",\n "required": "vehicle"\n')
    (tmp_path / "wrong.json").write_text('{"type": "object", "required": "vehicle"}\n')
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        definitions("{version: 1, file: broken.json}", "{version: 2, file: wrong.json}")
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(policy_file)
    assert caught.value.lines() == [
        f"{policy_file}:6: schema reading@1: {tmp_path}/broken.json:3: not valid JSON: "
        "Expecting ',' delimiter",
        f"{policy_file}:7: schema reading@2 (file wrong.json): not a valid JSON Schema at "
        "required: 'vehicle' is not of type 'array'",
    ]
