"""Reading the audit trail: records in time order across all chains, filtered; the newest;
new ones as they come.  Reading verifies nothing (``verify_audit`` does).

Stream entry ids are Redis server time, the same clock for every chain, so merging the chains
by entry id gives one time order (within one millisecond, by the gateways' clocks).  Filters
are applied as records are read (Redis keeps no index by principal or topic), and a time range
narrows what is read at all.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from pydantic import ValidationError

from mesh.audit.link import Link, as_page, entries, parse
from mesh.audit.record import AuditRecord, Decision
from mesh.audit.streams import chain_key, chain_names
from mesh.topology import matches

logger = logging.getLogger(__name__)

FOLLOW_BLOCK_MS = 1000
"""How long a follow waits for new records before it looks for new chains again."""


@dataclass(frozen=True)
class AuditEntry:
    """A stored record with its place in the trail."""

    chain: str
    id: str
    """Its stream entry id (Redis time of the append, ms, and a counter)."""
    seq: int
    kid: str
    prev: str
    mac: str
    record: AuditRecord

    def as_dict(self) -> dict[str, Any]:
        """One line of ``mesh audit export``: the record and what seals it."""
        return {
            "chain": self.chain,
            "id": self.id,
            "seq": self.seq,
            "kid": self.kid,
            "prev": self.prev,
            "mac": self.mac,
            "record": self.record.model_dump(mode="json", exclude_none=True),
        }


@dataclass(frozen=True)
class AuditFilter:
    """Which records to show; ``topic`` is a pattern (``vehicle.*.speed``, ``vehicle.#``)."""

    principal: str | None = None
    agent: str | None = None
    topic: str | None = None
    decision: Decision | None = None

    def accepts(self, record: AuditRecord) -> bool:
        return (
            (self.principal is None or self.principal in (record.principal, record.delegated_by))
            and (self.agent is None or record.agent == self.agent)
            and (self.decision is None or record.decision == self.decision)
            and (self.topic is None or matches(self.topic, record.topic))
        )


@dataclass(frozen=True)
class ChainInfo:
    chain: str
    records: int
    first: str | None
    """Entry id of its oldest record."""
    last: str | None
    last_seq: int | None


class AuditReader:
    """Reads the trail of mesh ``namespace``.  ``scan=False`` finds chains through their set
    alone (``chain_names``), for a Redis user without ``SCAN`` (the bridge's)."""

    def __init__(self, redis: aioredis.Redis, namespace: str, *, scan: bool = True) -> None:
        self.redis = redis
        self.namespace = namespace
        self.scan = scan

    async def chains(self) -> list[ChainInfo]:
        """Every chain with its length and oldest and newest entry."""
        found = []
        for chain in sorted(await chain_names(self.redis, self.namespace, scan=self.scan)):
            key = chain_key(self.namespace, chain)
            first = as_page(await self.redis.xrange(key, "-", "+", count=1))
            last = as_page(await self.redis.xrevrange(key, "+", "-", count=1))
            newest = _entry(chain, *last[0]) if last else None
            found.append(
                ChainInfo(
                    chain=chain,
                    records=int(await self.redis.xlen(key)),
                    first=first[0][0].decode() if first else None,
                    last=last[0][0].decode() if last else None,
                    last_seq=newest.seq if newest else None,
                )
            )
        return found

    async def entries(
        self,
        where: AuditFilter | None = None,
        *,
        since_ms: int | None = None,
        until_ms: int | None = None,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> AsyncIterator[AuditEntry]:
        """Records in time order (or newest first), of all chains, within the time range."""
        where = where or AuditFilter()
        start = "-" if since_ms is None else f"{since_ms}-0"
        end = "+" if until_ms is None else f"({until_ms}-0"
        chains = sorted(await chain_names(self.redis, self.namespace, scan=self.scan))
        streams = [self._records(c, start, end, newest_first) for c in chains]
        shown = 0
        async with aclosing(_merge(streams, newest_first)) as merged:
            async for entry in merged:
                if limit is not None and shown >= limit:
                    return
                if where.accepts(entry.record):
                    shown += 1
                    yield entry

    async def last(
        self, count: int, where: AuditFilter | None = None, *, until_ms: int | None = None
    ) -> list[AuditEntry]:
        """The newest ``count`` records that ``where`` accepts, oldest first."""
        found = self.entries(where, until_ms=until_ms, newest_first=True, limit=count)
        return [e async for e in found][::-1]

    async def now_ms(self) -> int:
        """Redis time (ms): where ``last(until_ms=…)`` may end and ``follow`` go on."""
        seconds, micros = await self.redis.time()
        return int(seconds * 1000 + micros // 1000)

    async def follow(
        self, where: AuditFilter | None = None, *, since_ms: int | None = None
    ) -> AsyncIterator[AuditEntry]:
        """Records appended from ``since_ms`` (Redis time; by default now) on, as they come,
        chains that start meanwhile included."""
        where = where or AuditFilter()
        positions: dict[str, str] = {}
        for chain in await chain_names(self.redis, self.namespace, scan=self.scan):
            if since_ms is not None:
                # XREAD returns what comes after an id: the last one before since_ms.
                positions[chain] = f"{since_ms - 1}-{2**64 - 1}" if since_ms > 0 else "0-0"
                continue
            page = as_page(await self.redis.xrevrange(chain_key(self.namespace, chain), count=1))
            positions[chain] = page[0][0].decode() if page else "0-0"
        while True:
            for chain in await chain_names(self.redis, self.namespace, scan=self.scan):
                positions.setdefault(chain, "0-0")  # a chain new since: all of it is new
            if not positions:
                return
            streams = {chain_key(self.namespace, c): p for c, p in positions.items()}
            reply = await self.redis.xread(streams, block=FOLLOW_BLOCK_MS)  # type: ignore[arg-type]
            prefix = len(chain_key(self.namespace, ""))
            batch: list[AuditEntry] = []
            for raw_key, raw_page in cast(list[tuple[bytes, Any]], reply or []):
                chain = raw_key.decode()[prefix:]
                for entry_id, fields in as_page(raw_page):
                    positions[chain] = entry_id.decode()
                    entry = _entry(chain, entry_id, fields)
                    if entry is not None:
                        batch.append(entry)
            for entry in sorted(batch, key=_order):
                if where.accepts(entry.record):
                    yield entry

    async def _records(
        self, chain: str, start: str, end: str, newest_first: bool
    ) -> AsyncGenerator[AuditEntry, None]:
        key = chain_key(self.namespace, chain)
        async for entry_id, link in entries(self.redis, key, start, end, reverse=newest_first):
            entry = None if link is None else _from_link(chain, link)
            if entry is None:
                logger.warning(
                    "audit entry %s of %s is unreadable (see mesh audit verify)", entry_id, chain
                )
                continue
            yield entry


def _entry(chain: str, entry_id: bytes, fields: dict[bytes, bytes]) -> AuditEntry | None:
    link = parse(entry_id, fields)
    return None if link is None else _from_link(chain, link)


def _from_link(chain: str, link: Link) -> AuditEntry | None:
    try:
        record = AuditRecord.model_validate_json(link.data)
    except ValidationError:
        return None
    return AuditEntry(chain, link.id, link.seq, link.kid, link.prev, link.mac, record)


def _order(entry: AuditEntry) -> tuple[int, float, int]:
    # Chains' entry ids share Redis' clock, but their counters are each stream's own.
    ms, _, counter = entry.id.partition("-")
    return int(ms), entry.record.time, int(counter or 0)


async def _merge(
    streams: Iterable[AsyncGenerator[AuditEntry, None]], newest_first: bool
) -> AsyncGenerator[AuditEntry, None]:
    """Entries of several id-ordered streams, in one id order."""
    heads: list[tuple[AuditEntry, AsyncGenerator[AuditEntry, None]]] = []
    try:
        for stream in streams:
            first = await anext(stream, None)
            if first is not None:
                heads.append((first, stream))
        while heads:
            pick = (max if newest_first else min)(
                range(len(heads)), key=lambda i: _order(heads[i][0])
            )
            entry, stream = heads[pick]
            yield entry
            following = await anext(stream, None)
            if following is None:
                heads.pop(pick)
            else:
                heads[pick] = (following, stream)
    finally:
        for _, stream in heads:
            await stream.aclose()

