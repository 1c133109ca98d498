"""``verify_audit`` names the first record that does not verify, and says what happened to it.

Stream entries cannot be edited in place, so tampering is done as one would with redis-cli:
XDEL and XADD (which lands at the stream's end), or rewriting the whole stream.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from audit_support import (
    Entry,
    append_all,
    chain_entries,
    keys_of,
    new_key,
    raw,
    record,
    rewrite,
    writing,
)

from mesh.audit import AuditKeys, Problem, verify_audit
from mesh.audit.streams import chain_key, chains_key, checkpoints_key
from mesh.config import Settings


@dataclass
class Trail:
    key: str
    chain: str
    stream: str
    entries: list[Entry]


@pytest.fixture
async def trail(redis: aioredis.Redis, namespace: str) -> Trail:
    """One chain of ten records, and the checkpoint its writer made as it closed."""
    key = new_key()
    async with writing(redis, namespace, key) as writer:
        await append_all(writer, [record(i) for i in range(10)])
    entries = await chain_entries(redis, namespace, writer.chain)
    return Trail(key, writer.chain, chain_key(namespace, writer.chain), entries)


async def only_problem(redis: aioredis.Redis, namespace: str, trail: Trail) -> Problem:
    report = await verify_audit(redis, namespace, keys_of(trail.key))
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


def forged(fields: dict[bytes, bytes], **changes: str) -> dict[bytes, bytes]:
    data = json.loads(fields[b"data"]) | changes
    return fields | {b"data": json.dumps(data).encode()}


async def test_an_untouched_trail_verifies(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    report = await verify_audit(redis, namespace, keys_of(trail.key))
    assert report.ok, report.problems
    assert report.records == 10
    assert report.chains[0].last_seq == 10
    assert report.checkpoints.records == 1


async def test_a_record_deleted_and_added_again_edited_is_named_edited(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    target_id, fields = trail.entries[4]
    await redis.xdel(trail.stream, target_id)
    new_id = await redis.xadd(trail.stream, forged(fields, decision="denied"))  # type: ignore[arg-type]
    problem = await only_problem(redis, namespace, trail)
    assert (problem.chain, problem.kind, problem.seq) == (trail.chain, "edited", 5)
    assert problem.entry == new_id.decode()
    assert "mac does not verify, and it was deleted and added again" in problem.detail


async def test_the_last_record_deleted_and_added_again_edited_is_named_edited(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    target_id, fields = trail.entries[-1]
    await redis.xdel(trail.stream, target_id)
    new_id = await redis.xadd(trail.stream, forged(fields, topic="elsewhere"))  # type: ignore[arg-type]
    problem = await only_problem(redis, namespace, trail)
    assert (problem.kind, problem.seq, problem.entry) == ("edited", 10, new_id.decode())


async def test_a_record_edited_by_rewriting_the_stream_is_named_edited(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    entries = list(trail.entries)
    entry_id, fields = entries[6]
    entries[6] = (entry_id, forged(fields, principal="someone-else"))
    await rewrite(redis, trail.stream, entries)
    problem = await only_problem(redis, namespace, trail)
    assert (problem.kind, problem.seq, problem.entry) == ("edited", 7, entry_id)


async def test_a_deleted_record_is_named_deleted(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    await redis.xdel(trail.stream, trail.entries[3][0])
    problem = await only_problem(redis, namespace, trail)
    assert (problem.kind, problem.seq, problem.entry) == ("deleted", 4, trail.entries[4][0])
    assert "seq 4 is missing" in problem.detail


async def test_records_cut_off_the_end_are_found_by_the_checkpoint(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    await redis.xdel(trail.stream, trail.entries[8][0], trail.entries[9][0])
    problem = await only_problem(redis, namespace, trail)
    assert (problem.kind, problem.seq) == ("deleted", 9)
    assert "seqs 9-10 are missing from the end" in problem.detail


async def test_a_chain_deleted_whole_is_found_by_the_checkpoint(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    await redis.delete(trail.stream)
    await redis.srem(chains_key(namespace), trail.chain)  # type: ignore[misc]
    problem = await only_problem(redis, namespace, trail)
    assert (problem.chain, problem.kind, problem.seq) == (trail.chain, "deleted", 1)
    assert "the chain is gone" in problem.detail


async def test_an_inserted_record_is_named_inserted(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    """A forged record slipped in before seq 5, claiming to be seq 5 (the stream rewritten
    with ids of one's own, as an insertion needs)."""
    genuine = [fields for _, fields in trail.entries]
    fake = forged(genuine[4], decision="allowed", topic="payments.approved")
    rows = [*genuine[:4], fake, *genuine[4:]]
    await rewrite(redis, trail.stream, [(f"1-{n}", fields) for n, fields in enumerate(rows, 1)])
    problem = await only_problem(redis, namespace, trail)
    assert (problem.kind, problem.seq, problem.entry) == ("inserted", 5, "1-5")
    assert "genuine seq 5 follows" in problem.detail


async def test_a_record_added_with_a_seq_taken_is_named_inserted(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    new_id = await redis.xadd(trail.stream, forged(trail.entries[2][1], agent="v9"))  # type: ignore[arg-type]
    problem = await only_problem(redis, namespace, trail)
    assert (problem.kind, problem.seq, problem.entry) == ("inserted", 3, new_id.decode())
    assert "came already" in problem.detail


async def test_a_record_moved_is_named_reordered(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    """Seq 5 deleted and added again unchanged: it now stands at the end."""
    target_id, fields = trail.entries[4]
    await redis.xdel(trail.stream, target_id)
    await redis.xadd(trail.stream, fields)  # type: ignore[arg-type]
    problem = await only_problem(redis, namespace, trail)
    assert (problem.kind, problem.seq, problem.entry) == ("reordered", 6, trail.entries[5][0])
    assert "seq 6 comes before seq 5" in problem.detail


async def test_two_records_swapped_are_named_reordered(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    entries = list(trail.entries)
    (id2, f2), (id3, f3) = entries[1], entries[2]
    entries[1], entries[2] = (id2, f3), (id3, f2)
    await rewrite(redis, trail.stream, entries)
    problem = await only_problem(redis, namespace, trail)
    assert (problem.kind, problem.seq, problem.entry) == ("reordered", 3, id2)


async def test_an_edited_checkpoint_is_named(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    stream = checkpoints_key(namespace)
    [(entry_id, fields)] = await raw(redis, stream)
    data = json.loads(fields[b"data"])
    data["tips"] = {}  # hide the chain's end from verification
    await rewrite(redis, stream, [(entry_id, fields | {b"data": json.dumps(data).encode()})])
    problem = await only_problem(redis, namespace, trail)
    assert (problem.chain, problem.kind, problem.seq) == ("_checkpoints", "edited", 1)


async def test_records_sealed_before_a_key_rotation_verify_with_the_old_key(
    redis: aioredis.Redis, namespace: str, tmp_path: Path
) -> None:
    old, new = new_key(), new_key()
    async with writing(redis, namespace, old, key_id="k1") as before:
        await append_all(before, [record(i) for i in range(5)])
    async with writing(redis, namespace, new, key_id="k2") as after:
        await append_all(after, [record(i) for i in range(5, 10)])

    # The new key alone: what the old one sealed cannot be verified, and says which id it needs.
    report = await verify_audit(redis, namespace, keys_of(new, "k2"))
    kinds = {(p.chain, p.kind, p.seq) for p in report.problems}
    assert (before.chain, "unverifiable", 1) in kinds
    assert ("_checkpoints", "unverifiable", 1) in kinds
    assert all("'k1'" in p.detail for p in report.problems)

    # The old key from MESH_AUDIT_KEYS_FILE, the new one current: all verifies.
    keys_file = tmp_path / "audit-keys"
    keys_file.write_text(f"# retired 2024-06-01\nk1 {old}\n")
    settings = Settings.from_env(
        {"MESH_AUDIT_KEY": new, "MESH_AUDIT_KEY_ID": "k2", "MESH_AUDIT_KEYS_FILE": str(keys_file)}
    )
    keys = AuditKeys.from_settings(settings)
    assert keys.ids == ["k1", "k2"] and keys.current_id == "k2"
    assert old not in repr(keys) and new not in repr(keys)
    report = await verify_audit(redis, namespace, keys)
    assert report.ok, report.problems
    assert report.records == 10


async def test_a_wrong_key_verifies_nothing(
    redis: aioredis.Redis, namespace: str, trail: Trail
) -> None:
    report = await verify_audit(redis, namespace, keys_of(new_key()))
    assert {(p.chain, p.kind, p.seq) for p in report.problems} == {
        ("_checkpoints", "edited", 1),
        (trail.chain, "edited", 1),
    }


async def test_a_long_chain_is_verified_page_by_page(redis: aioredis.Redis, namespace: str) -> None:
    """Entries are read a page at a time; looking for a missing seq reads on across pages."""
    key = new_key()
    async with writing(redis, namespace, key) as writer:
        await asyncio.gather(*(writer.append(record(i)) for i in range(1200)))
    stream = chain_key(namespace, writer.chain)
    entries = await chain_entries(redis, namespace, writer.chain)
    report = await verify_audit(redis, namespace, keys_of(key))
    assert report.ok and report.records == 1200, report.problems

    moved_id, moved = entries[299]  # seq 300, re-added at the end, two pages on
    await redis.xdel(stream, moved_id)
    await redis.xadd(stream, moved)  # type: ignore[arg-type]
    report = await verify_audit(redis, namespace, keys_of(key))
    [problem] = report.problems
    assert (problem.kind, problem.seq, problem.entry) == ("reordered", 301, entries[300][0])
