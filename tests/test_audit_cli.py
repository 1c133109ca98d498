"""``mesh audit``: verify, chains, tail, query, export and trim, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from audit_support import append_all, chain_entries, new_key, record, writing
from helpers import mesh_cli

from mesh.audit import AuditKeys
from mesh.audit.streams import chain_key
from mesh.config import ConfigError, Settings


@pytest.fixture
def audit_settings(mesh_base_settings: Settings, namespace: str) -> Settings:
    """The test's namespace; the audit commands need Redis only."""
    return mesh_base_settings.model_copy(update={"namespace": namespace})


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = new_key()
    monkeypatch.setenv("MESH_AUDIT_KEY", key)
    monkeypatch.setenv("MESH_AUDIT_KEY_ID", "k1")
    return key


async def test_verify_passes_then_names_the_record_changed(
    redis: aioredis.Redis, namespace: str, audit_settings: Settings, key: str
) -> None:
    async with writing(redis, namespace, key, replica="gateway") as writer:
        await append_all(writer, [record(i) for i in range(5)])

    code, out, err = await mesh_cli(audit_settings, "audit", "verify")
    assert code == 0, (out, err)
    assert "verified 5 record(s) in 1 chain(s) and 1 checkpoint(s)" in out
    assert out.rstrip().endswith("OK")
    assert key not in out + err

    # What one can do with redis-cli: XDEL the record, XADD it again with a field changed.
    stream = chain_key(namespace, writer.chain)
    entry_id, fields = (await chain_entries(redis, namespace, writer.chain))[2]
    data = json.loads(fields[b"data"]) | {"decision": "allowed", "principal": "nobody"}
    await redis.xdel(stream, entry_id)
    new_id = (
        await redis.xadd(stream, fields | {b"data": json.dumps(data).encode()})  # type: ignore[arg-type]
    ).decode()

    code, out, err = await mesh_cli(audit_settings, "audit", "verify")
    assert code == 1, (out, err)
    assert f"NOT VERIFIED  {writer.chain}: edited (seq 3, entry {new_id})" in out


async def test_tail_query_export_and_chains(
    redis: aioredis.Redis, namespace: str, audit_settings: Settings, key: str, tmp_path: Path
) -> None:
    async with writing(redis, namespace, key, replica="gateway") as writer:
        await append_all(writer, [record(i) for i in range(6)])
        await writer.append(
            record(
                6,
                message_id="m-denied",
                principal="monitor",
                decision="denied",
                stage="authorize",
                reason="publish 'vehicle.v0.cmd': no rule",
                topic="vehicle.v0.cmd",
            )
        )

    code, out, err = await mesh_cli(
        audit_settings, "audit", "query", "--principal", "monitor", "--json"
    )
    assert code == 0, err
    [found] = json.loads(out)
    assert (found["chain"], found["seq"]) == (writer.chain, 7)
    assert found["record"]["message_id"] == "m-denied"

    code, out, err = await mesh_cli(
        audit_settings, "audit", "query", "--decision", "denied", "--topic", "vehicle.*.cmd",
        "--since", "1h",
    )
    assert code == 0, err
    [line] = out.splitlines()
    assert "denied  v0/i1 (monitor)  event  vehicle.v0.cmd" in line
    assert "authorize: publish 'vehicle.v0.cmd': no rule" in line

    code, out, err = await mesh_cli(audit_settings, "audit", "tail", "-n", "2", "--json")
    assert code == 0, err
    assert [json.loads(row)["seq"] for row in out.splitlines()] == [6, 7]

    target = tmp_path / "audit.jsonl"
    code, out, err = await mesh_cli(audit_settings, "audit", "export", "--output", str(target))
    assert code == 0, err
    assert "exported 7 record(s)" in err
    rows = [json.loads(row) for row in target.read_text().splitlines()]
    assert [row["seq"] for row in rows] == list(range(1, 8))
    assert {"chain", "id", "kid", "prev", "mac", "record"} <= set(rows[0])



async def test_trim_then_verify(
    redis: aioredis.Redis, namespace: str, audit_settings: Settings, key: str
) -> None:
    async with writing(redis, namespace, key, replica="gateway") as writer:
        await append_all(writer, [record(i) for i in range(4)])

    code, out, err = await mesh_cli(audit_settings, "audit", "chains", "--json")
    assert code == 0, err
    [chain] = json.loads(out)
    assert (chain["chain"], chain["records"], chain["last_seq"]) == (writer.chain, 4, 4)

    code, out, err = await mesh_cli(audit_settings, "audit", "trim", "--keep", "0s")
    assert code == 0, err
    assert "verified 4 record(s); removed 4 record(s) and 1 checkpoint(s)" in out
    assert f"removed whole: {writer.chain}" in out
    code, out, err = await mesh_cli(audit_settings, "audit", "verify")
    assert code == 0, (out, err)
    assert "verified 0 record(s) in 0 chain(s) and 1 checkpoint(s)" in out


async def test_verify_without_a_key_says_what_to_set(
    audit_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("MESH_AUDIT_KEY", "MESH_AUDIT_KEY_FILE", "MESH_AUDIT_KEYS_FILE"):
        monkeypatch.delenv(variable, raising=False)
    code, _, err = await mesh_cli(audit_settings, "audit", "verify")
    assert code == 1
    assert "no audit key: set MESH_AUDIT_KEY" in err


def test_a_short_key_is_refused_without_being_shown() -> None:
    with pytest.raises(ConfigError) as refused:
        AuditKeys.from_settings(Settings.from_env({"MESH_AUDIT_KEY": "short-secret"}))
    assert "audit key 'k1' is 12 characters; use 32 or more" in str(refused.value)
    assert "short-secret" not in str(refused.value)
