"""Verifying the audit trail: the checkpoint stream and every chain, entry by entry.

From where a stream begins (``seq`` 1 after ``GENESIS``, or where the newest trim checkpoint
says it was cut), each entry must carry the next ``seq``, the ``mac`` of the entry before as
``prev``, and a ``mac`` its key verifies.  The first entry that does not is named, with what
the entries around it tell:

``edited``        its ``mac`` does not verify where it stands, or where it went: Redis takes a
                  new entry only at a stream's end, so a record deleted and added again with
                  other fields turns up there
``deleted``       ``seq`` numbers are missing and no entry further on has them; or a chain
                  ends, or is gone, before the ``seq`` a checkpoint saw it reach
``inserted``      an entry that does not belong: its ``seq`` came already, or its ``mac``
                  fails and the genuine entry of its ``seq`` follows
``reordered``     genuine entries out of order: a later ``seq`` comes first
``unverifiable``  sealed with a key id none of the given keys has

Checkpoints say how far each chain had come; what a chain gained after the newest checkpoint
only its links protect, so a cut-off end younger than the checkpoint interval goes unseen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import ValidationError

from mesh.audit.checkpoint import ChainPosition, Checkpoint
from mesh.audit.keys import AuditKeys
from mesh.audit.link import GENESIS, Link, entries
from mesh.audit.streams import CHECKPOINTS, chain_names, chains_key, stream_key

ProblemKind = Literal["edited", "deleted", "inserted", "reordered", "unverifiable"]

CONCURRENCY = 8
"""Chains verified at once: one's Redis reads overlap another's hashing."""


@dataclass(frozen=True)
class Problem:
    """The first entry of a chain that does not verify, and what it looks like."""

    chain: str
    kind: ProblemKind
    seq: int | None
    """The entry's ``seq`` (for ``deleted``: the first one missing)."""
    entry: str | None
    """The stream entry id (for ``deleted``: the entry after the gap, if any)."""
    detail: str

    def __str__(self) -> str:
        at = [f"seq {self.seq}"] if self.seq is not None else []
        if self.entry is not None:
            at.append(f"entry {self.entry}")
        return f"{self.chain}: {self.kind} ({', '.join(at)}): {self.detail}"


@dataclass
class ChainReport:
    """What verifying one chain (or the checkpoint stream) found."""

    chain: str
    records: int = 0
    """Entries that verified."""
    first_seq: int | None = None
    last_seq: int | None = None
    last_entry: str | None = None
    begins_after: int = 0
    """The ``seq`` a trim cut the chain after (0: it is whole)."""
    problem: Problem | None = None


@dataclass(frozen=True)
class Claim:
    """A chain's newest record as the newest checkpoint mentioning the chain saw it."""

    position: ChainPosition
    checkpoint: str
    """That checkpoint's entry id."""


@dataclass
class VerifyReport:
    checkpoints: ChainReport
    chains: list[ChainReport]
    seconds: float = 0.0
    cuts: dict[str, ChainPosition] = field(default_factory=dict)
    """Where each stream begins, per the newest trim checkpoint."""
    claims: dict[str, Claim] = field(default_factory=dict)

    @property
    def problems(self) -> list[Problem]:
        reports = [self.checkpoints, *self.chains]
        return [r.problem for r in reports if r.problem is not None]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def records(self) -> int:
        """Records verified, in all chains."""
        return sum(r.records for r in self.chains)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "checkpoints": asdict(self.checkpoints),
            "chains": [asdict(r) for r in self.chains],
            "problems": [asdict(p) | {"text": str(p)} for p in self.problems],
            "seconds": round(self.seconds, 3),
        }


async def verify_audit(
    redis: aioredis.Redis,
    namespace: str,
    keys: AuditKeys,
    *,
    chains: Collection[str] | None = None,
) -> VerifyReport:
    """Verify the checkpoint stream and every chain of ``namespace`` (or only ``chains``)."""
    started = time.perf_counter()
    trail = _Trail(redis, namespace, keys)
    cuts, claims = await _read_checkpoints(trail)
    checkpoints = await _Walk(trail, CHECKPOINTS, cuts.get(CHECKPOINTS)).run()
    listed = {
        raw.decode() if isinstance(raw, bytes) else raw
        for raw in await redis.smembers(chains_key(namespace))
    }
    names = (await chain_names(redis, namespace)) | set(claims) | (set(cuts) - {CHECKPOINTS})
    if chains is not None:
        names &= set(chains)
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(name: str) -> ChainReport | None:
        async with limit:
            return await _verify_chain(trail, name, cuts.get(name), claims.get(name), listed)

    found = await asyncio.gather(*(one(name) for name in sorted(names)))
    return VerifyReport(
        checkpoints=checkpoints,
        chains=[r for r in found if r is not None],
        seconds=time.perf_counter() - started,
        cuts=cuts,
        claims=claims,
    )


@dataclass(frozen=True)
class _Trail:
    redis: aioredis.Redis
    namespace: str
    keys: AuditKeys


async def _read_checkpoints(trail: _Trail) -> tuple[dict[str, ChainPosition], dict[str, Claim]]:
    """The cuts of the newest trim checkpoint, and each chain's newest claim, from the
    checkpoints that verify on their own (a forged one says nothing)."""
    stream = stream_key(trail.namespace, CHECKPOINTS)
    cuts: dict[str, ChainPosition] = {}
    claims: dict[str, Claim] = {}
    async for _, link in entries(trail.redis, stream):
        key = None if link is None else trail.keys.get(link.kid)
        if link is None or key is None or not link.sealed_with(key, stream):
            continue
        try:
            checkpoint = Checkpoint.model_validate_json(link.data)
        except ValidationError:
            continue
        for chain, position in checkpoint.tips.items():
            claims[chain] = Claim(position, link.id)
        if checkpoint.trim:
            cuts = dict(checkpoint.cuts)
    return cuts, claims


async def _verify_chain(
    trail: _Trail, chain: str, cut: ChainPosition | None, claim: Claim | None, listed: set[str]
) -> ChainReport | None:
    """A chain's report; ``None`` for one a trim removed whole, as it should have."""
    if claim is not None and cut is not None and claim.position.seq <= cut.seq:
        claim = None  # the trim removed what the checkpoint saw
    if await trail.redis.xlen(stream_key(trail.namespace, chain)):
        return await _Walk(trail, chain, cut, claim).run()
    first = cut.seq + 1 if cut else 1
    if claim is not None:
        seen = claim.position.seq
        detail = f"the chain is gone; checkpoint {claim.checkpoint} saw it at seq {seen}"
    elif chain in listed and cut is None:
        detail = f"the chain is gone; {chains_key(trail.namespace)} lists it"
    else:
        return None
    problem = Problem(chain, "deleted", first, None, detail)
    return ChainReport(chain, begins_after=cut.seq if cut else 0, problem=problem)


class _Walk:
    """One stream, entry by entry, up to the first that does not verify."""

    def __init__(
        self, trail: _Trail, chain: str, cut: ChainPosition | None, claim: Claim | None = None
    ) -> None:
        self.redis = trail.redis
        self.chain = chain
        self.stream = stream_key(trail.namespace, chain)
        self.keys = trail.keys
        self.claim = claim
        self.report = ChainReport(chain, begins_after=cut.seq if cut else 0)
        self.expected = cut.seq + 1 if cut else 1
        self.last_mac = cut.mac if cut else GENESIS

    async def run(self) -> ChainReport:
        report = self.report
        async for entry_id, link in entries(self.redis, self.stream):
            problem = await self._check(entry_id, link)
            if problem is not None:
                report.problem = problem
                return report
            assert link is not None
            if report.first_seq is None:
                report.first_seq = link.seq
            report.records += 1
            report.last_seq, report.last_entry = link.seq, link.id
            self.expected, self.last_mac = link.seq + 1, link.mac
        claim = self.claim
        if claim is not None and claim.position.seq >= self.expected:
            missing = _seqs(self.expected, claim.position.seq)
            report.problem = Problem(
                self.chain,
                "deleted",
                self.expected,
                None,
                f"{missing} missing from the end; checkpoint {claim.checkpoint} saw the chain "
                f"at seq {claim.position.seq}",
            )
        return report

    def _genuine(self, link: Link) -> bool:
        key = self.keys.get(link.kid)
        return key is not None and link.sealed_with(key, self.stream)

    async def _check(self, entry_id: str, link: Link | None) -> Problem | None:
        if link is None:
            return self._problem("edited", None, entry_id, "its fields are not an audit entry's")
        key = self.keys.get(link.kid)
        if key is None:
            return self._problem(
                "unverifiable",
                link.seq,
                link.id,
                f"sealed with key id {link.kid!r}, which none of the keys given has "
                f"({', '.join(self.keys.ids)}); add it to MESH_AUDIT_KEYS_FILE",
            )
        sealed = link.sealed_with(key, self.stream)
        if sealed and link.seq == self.expected and link.prev == self.last_mac:
            claim = self.claim
            if claim and claim.position.seq == link.seq and claim.position.mac != link.mac:
                return self._problem(
                    "inserted",
                    link.seq,
                    link.id,
                    f"it verifies, but checkpoint {claim.checkpoint} saw another record there",
                )
            return None
        return await self._classify(link, sealed)

    async def _classify(self, link: Link, sealed: bool) -> Problem:
        expected, seq = self.expected, link.seq
        if seq == expected:
            if sealed:
                return self._problem(
                    "inserted",
                    seq,
                    link.id,
                    f"it verifies but does not follow seq {seq - 1} (its prev differs): "
                    "a record of another chain's history",
                )
            if link.prev == self.last_mac:
                genuine = await self._later(seq, link.id)
                if genuine is not None and self._genuine(genuine):
                    return self._problem(
                        "inserted",
                        seq,
                        link.id,
                        f"its mac does not verify, and the genuine seq {seq} follows "
                        f"(entry {genuine.id})",
                    )
            return self._problem("edited", seq, link.id, "its mac does not verify")
        if seq < expected:
            what = "a copy of a genuine record" if sealed else "its mac does not verify"
            detail = f"seq {seq} came already, where {expected} was due; {what}"
            return self._problem("inserted", seq, link.id, detail)
        later = await self._later(expected, link.id)
        if later is None:
            if sealed:
                return self._problem(
                    "deleted",
                    expected,
                    link.id,
                    f"{_seqs(expected, seq - 1)} missing before this entry (seq {seq})",
                )
            return self._problem(
                "edited",
                seq,
                link.id,
                f"its mac does not verify (its seq says {seq}, where {expected} was due)",
            )
        if not self._genuine(later):
            return self._problem(
                "edited",
                later.seq,
                later.id,
                "its mac does not verify, and it was deleted and added again (at the stream's "
                f"end, not after seq {expected - 1})",
            )
        if sealed:
            return self._problem(
                "reordered", seq, link.id, f"seq {seq} comes before seq {expected} ({later.id})"
            )
        return self._problem(
            "inserted",
            seq,
            link.id,
            f"its mac does not verify, and the genuine seq {expected} follows (entry {later.id})",
        )

    async def _later(self, seq: int, after: str) -> Link | None:
        """The first entry after ``after`` that has ``seq``."""
        async for _, link in entries(self.redis, self.stream, f"({after}"):
            if link is not None and link.seq == seq:
                return link
        return None

    def _problem(
        self, kind: ProblemKind, seq: int | None, entry: str | None, detail: str
    ) -> Problem:
        return Problem(self.chain, kind, seq, entry, detail)


def _seqs(first: int, last: int) -> str:
    return f"seq {first} is" if first == last else f"seqs {first}-{last} are"
