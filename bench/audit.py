"""Audit trail throughput: batched appends, several replicas, and verification, on a real Redis.

    python bench/audit.py [--records 20000] [--concurrency 1,16,128,512] [--replicas 2]

Uses ``MESH_REDIS_URL`` (default the local Redis) and a namespace of its own, deleted at the
end.  "concurrent" is how many appends are in flight at once (the gateway relay has up to 512
messages in flight); every append completes only once Redis stored its record, so a lone
appender pays a round trip per record, and concurrent ones share round trips (the records
that arrive during one flush go in the next).  "unbatched" appends one record per round trip
(``max_batch=1``), for comparison.  Verification is the whole trail: every record's HMAC and
links, and the checkpoints.  "cpu" is this process's CPU time per record.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from mesh.audit import AuditKeys, AuditRecord, AuditWriter, Finding, payload_sha256, verify_audit
from mesh.config import Settings

KEY_ID = "k1"


def sample(i: int) -> AuditRecord:
    """A record the size a gateway writes: ids, a digest, a finding now and then."""
    return AuditRecord(
        decision="redacted" if i % 10 == 0 else "allowed",
        stage="dlp" if i % 10 == 0 else None,
        principal="vehicles",
        user="mesh.vehicles",
        agent=f"v{i % 500}",
        instance="3f9a1c2e",
        type="event",
        topic=f"vehicle.v{i % 500}.speed",
        message_id=uuid.uuid4().hex,
        payload_sha256=payload_sha256(str(i).encode()),
        findings=(Finding(kind="email", path="$.owner.email"),) if i % 10 == 0 else (),
    )


async def append_round(
    redis: aioredis.Redis,
    namespace: str,
    key: str,
    *,
    records: int,
    concurrency: int,
    replicas: int = 1,
    max_batch: int | None = None,
) -> tuple[float, float, int]:
    """(records/s, cpu ms per record, round trips) appending ``records`` in all."""
    options = {} if max_batch is None else {"max_batch": max_batch}
    writers = [
        AuditWriter(redis, namespace, f"bench{r}", key, KEY_ID, checkpoint_interval=3600, **options)
        for r in range(replicas)
    ]
    for writer in writers:
        await writer.start()
    per_task = records // (concurrency * replicas)
    prepared = [sample(i) for i in range(per_task * concurrency * replicas)]

    async def task(writer: AuditWriter, offset: int) -> None:
        for i in range(per_task):
            await writer.append(prepared[offset + i])

    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(
        *(
            task(writer, (w * concurrency + t) * per_task)
            for w, writer in enumerate(writers)
            for t in range(concurrency)
        )
    )
    elapsed = time.perf_counter() - start
    cpu_ms = (time.process_time() - cpu) * 1000 / len(prepared)
    for writer in writers:
        await writer.close()
    return len(prepared) / elapsed, cpu_ms, sum(w.batches for w in writers)


async def main(args: argparse.Namespace) -> None:
    url = Settings.from_env().redis_url
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    redis = aioredis.Redis.from_url(url)
    key = secrets.token_hex(32)
    try:
        print(f"append, {args.records} records each round; redis {url.rsplit('@', 1)[-1]}")
        for concurrency in args.concurrency:
            # A lone appender waits a round trip per record: fewer of them, same figure.
            records = args.records if concurrency > 1 else min(args.records, 2000)
            rate, cpu_ms, trips = await append_round(
                redis, namespace, key, records=records, concurrency=concurrency
            )
            print(
                f"  1 replica,  {concurrency:4d} concurrent  {rate:9.0f} records/s  "
                f"cpu {cpu_ms:.3f} ms  {records / trips:6.1f} records per round trip"
            )
        concurrency = max(args.concurrency)
        rate, cpu_ms, trips = await append_round(
            redis, namespace, key, records=args.records, concurrency=concurrency, max_batch=1
        )
        print(
            f"  unbatched,  {concurrency:4d} concurrent  {rate:9.0f} records/s  "
            f"cpu {cpu_ms:.3f} ms  {args.records / trips:6.1f} records per round trip"
        )
        rate, cpu_ms, trips = await append_round(
            redis,
            namespace,
            key,
            records=args.records,
            concurrency=concurrency,
            replicas=args.replicas,
        )
        print(
            f"  {args.replicas} replicas, {concurrency:4d} concurrent each  {rate:9.0f} records/s  "
            f"cpu {cpu_ms:.3f} ms  {args.records / trips:6.1f} records per round trip"
        )

        keys = AuditKeys({KEY_ID: key}, KEY_ID)
        cpu = time.process_time()
        report = await verify_audit(redis, namespace, keys)
        cpu_ms = (time.process_time() - cpu) * 1000 / max(report.records, 1)
        assert report.ok, report.problems
        print(
            f"verify: {report.records} records in {len(report.chains)} chains and "
            f"{report.checkpoints.records} checkpoints in {report.seconds:.2f} s: "
            f"{report.records / report.seconds:.0f} records/s  cpu {cpu_ms:.3f} ms"
        )
    finally:
        keys_found = [k async for k in redis.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys_found:
            await redis.unlink(*keys_found)
        await redis.aclose()


def _counts(value: str) -> list[int]:
    return [int(part) for part in value.split(",") if part.strip()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000, help="records per round")
    parser.add_argument(
        "--concurrency", type=_counts, default=[1, 16, 128, 512], help="appends in flight"
    )
    parser.add_argument("--replicas", type=int, default=2, help="writers in the last round")
    asyncio.run(main(parser.parse_args()))
