"""``mesh schema export``: the policy's topics and request operations with their schemas as an
AsyncAPI 3.0 document, valid against the AsyncAPI 3.0.0 JSON Schema (kept in tests/data).

Pure logic: no broker, no Redis.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from jsonschema import Draft7Validator
from payloads import Reading

from mesh.cli import main

ASYNCAPI_SCHEMA = Path(__file__).parent / "data" / "asyncapi" / "3.0.0.schema.json.gz"

POLICY = """\
principals:
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
schemas:
  definitions:
    reading:
      - version: 1
        file: reading.json
      - version: 2
        model: payloads:Reading
    status:
      - version: 1
        inline: {type: object, properties: {verbose: {type: boolean}}}
    join:
      - version: 1
        inline: {type: object, required: [agent]}
  payloads:
    - topics: ["vehicle.*.speed", "fleet.#"]
      accept: reading
    - request: {agent: "v[0-9]*", operation: status}
      accept: status@1
    - topics: _registry.join
      accept: join
  require: ["vehicle.#"]
"""
READING = {"type": "object", "required": ["vehicle", "speed_kmh"]}


@pytest.fixture(scope="module")
def asyncapi() -> Draft7Validator:
    return Draft7Validator(json.loads(gzip.decompress(ASYNCAPI_SCHEMA.read_bytes())))


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    (tmp_path / "reading.json").write_text(json.dumps(READING))
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def export(*args: str) -> str:
    result = CliRunner().invoke(main, ["schema", "export", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def problems(validator: Draft7Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in validator.iter_errors(document)
    ]


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def resolve(document: Any, ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_the_export_is_a_valid_asyncapi_3_document(
    policy_file: Path, asyncapi: Draft7Validator, tmp_path: Path
) -> None:
    document = yaml.safe_load(export(str(policy_file)))
    assert document["asyncapi"] == "3.0.0"
    assert problems(asyncapi, document) == []
    # The validator is no rubber stamp: a document without its version is refused.
    broken = {**document, "info": {"title": "x"}}
    assert problems(asyncapi, broken)
    # -o: JSON or YAML by the extension, the same document.
    export(str(policy_file), "-o", str(tmp_path / "out.json"))
    export(str(policy_file), "-o", str(tmp_path / "out.yml"))
    assert json.loads((tmp_path / "out.json").read_text()) == document
    assert yaml.safe_load((tmp_path / "out.yml").read_text()) == document


def test_every_reference_in_the_document_resolves(policy_file: Path) -> None:
    document = yaml.safe_load(export(str(policy_file)))
    refs = list(references(document))
    assert len(refs) > 10
    for ref in refs:
        resolve(document, ref)
    # An operation's messages are its channel's, as AsyncAPI requires.
    for operation in document["operations"].values():
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel + "/messages/")


def test_channels_per_topic_pattern_with_send_and_receive(policy_file: Path) -> None:
    document = yaml.safe_load(export(str(policy_file)))
    channels, operations = document["channels"], document["operations"]
    speed = channels["vehicle.any.speed"]
    assert speed["address"] == "vehicle.{word1}.speed"
    assert speed["x-mesh-pattern"] == "vehicle.*.speed"
    assert set(speed["parameters"]) == {"word1"}
    assert set(speed["messages"]) == {"reading.v1", "reading.v2"}
    assert speed["bindings"]["amqp"]["exchange"]["name"] == "mesh.policy"
    assert channels["fleet.all"]["address"] == "fleet.{words1}"
    assert channels["_registry.join"]["bindings"]["amqp"]["exchange"]["name"] == (
        "mesh.policy.internal"
    )
    assert operations["vehicle.any.speed.send"]["action"] == "send"
    assert operations["vehicle.any.speed.receive"]["action"] == "receive"
    assert document["x-mesh-require"] == ["vehicle.#"]


def test_messages_per_schema_version_carry_its_header_and_payload_schema(
    policy_file: Path,
) -> None:
    messages = yaml.safe_load(export(str(policy_file)))["components"]["messages"]
    v1, v2 = messages["reading.v1"], messages["reading.v2"]
    assert v1["headers"]["properties"]["x-mesh-schema"]["const"] == "reading@1"
    assert v1["headers"]["required"] == ["x-mesh-schema"]
    assert v1["payload"] == {
        "schemaFormat": "application/schema+json;version=draft-2020-12",
        "schema": READING,
    }
    assert v2["payload"]["schema"] == Reading.model_json_schema()
    assert v2["summary"] == "Version 2 of schema reading (model payloads:Reading)."


def test_request_operations_are_request_reply(policy_file: Path) -> None:
    document = yaml.safe_load(export(str(policy_file)))
    [request_id] = [c for c in document["channels"] if c.startswith("request.")]
    channel = document["channels"][request_id]
    assert channel["address"] == "_req.{agent}.status"
    assert channel["parameters"]["agent"]["description"] == (
        "the agent id, matching the glob v[0-9]*"
    )
    assert set(channel["messages"]) == {"status.v1"}
    operation = document["operations"][request_id]
    assert operation["action"] == "send"
    assert operation["reply"]["channel"] == {"$ref": "#/channels/replies"}
    assert document["channels"]["replies"]["address"] == "_reply.{agent}.{instance}"
    assert set(document["components"]["messages"]) >= {"reply", "error", "status.v1"}


def test_a_bad_policy_prints_its_problems_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)  # reading.json is missing
    result = CliRunner().invoke(main, ["schema", "export", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"{path}:7: schema reading@1: file {tmp_path}/reading.json does not exist\n"
    )


def test_a_policy_without_schemas_exports_no_channels(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.partition("schemas:")[0])
    result = CliRunner().invoke(main, ["schema", "export", str(path)])
    assert result.exit_code == 0
    assert "declares no schemas" in result.stderr
    document = yaml.safe_load(result.stdout)
    assert document["channels"] == {} and document["operations"] == {}
