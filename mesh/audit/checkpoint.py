"""Signed checkpoints: where every chain ended at one moment, and where trims cut.

A checkpoint is an entry of the checkpoint stream, sealed and linked like a chain's records
(see ``link``).  Its data:

``tips``  chain → its newest record when the checkpoint was made.  Verification requires each
          to be there (or trimmed), so a chain cut short or deleted whole after a checkpoint
          saw it is found.  What a chain gained after the newest checkpoint has only its own
          links to protect it: the checkpoint interval bounds how much that is.
``cuts``  (trim checkpoints) chain → the last record a trim removed, where the chain now
          begins; ``_checkpoints`` is the checkpoint stream's own.  Each trim carries the
          cuts forward, so the newest trim checkpoint holds all of them.

Writers append a checkpoint every ``audit_checkpoint_interval`` while they append records,
and one as they close.  Several writers and a trim append checkpoints at once, so an append
is a compare-and-set on the stream's newest ``mac`` (a Lua script), retried on a conflict.
Checkpoints are few, so that round trip costs nothing that matters; records cannot afford it,
which is why each writer has a chain of its own.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import ResponseError

from mesh.audit.errors import AuditError
from mesh.audit.link import (
    GENESIS,
    MOVED,
    TIP_LUA,
    as_page,
    entry_fields,
    last_link,
    parse,
    seal,
)
from mesh.audit.streams import chain_key, chains_key, checkpoints_key

ATTEMPTS = 5


class ChainPosition(BaseModel):
    """One record's place in its chain: its ``seq``, ``mac`` and stream entry id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq: int = Field(ge=1)
    mac: str
    id: str


class Checkpoint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    time: float
    by: str
    """The chain whose writer made it, or ``trim``."""
    tips: dict[str, ChainPosition] = {}
    cuts: dict[str, ChainPosition] = {}
    trim: bool = False
    """Made by a trim: its ``cuts`` say where every stream begins now."""

    def dump(self) -> bytes:
        return self.model_dump_json().encode()


# KEYS: the checkpoint stream.  ARGV: the mac of its newest entry as the caller saw it, then
# the new entry's seq, prev, kid, mac and data.  Returns the new entry's id.
_APPEND = (
    TIP_LUA
    + f"""
if tip_of(KEYS[1]) ~= ARGV[1] then return redis.error_reply('{MOVED}') end
return redis.call('XADD', KEYS[1], '*', 'seq', ARGV[2], 'prev', ARGV[3], 'kid', ARGV[4],
                  'mac', ARGV[5], 'data', ARGV[6])
"""
)


async def chain_tips(redis: aioredis.Redis, namespace: str) -> dict[str, ChainPosition]:
    """The newest record of every chain in the set, as stored (verification checks them)."""
    names = sorted(
        raw.decode() if isinstance(raw, bytes) else raw
        for raw in await redis.smembers(chains_key(namespace))
    )
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.xrevrange(chain_key(namespace, name), "+", "-", count=1)
        pages = await pipe.execute()
    tips: dict[str, ChainPosition] = {}
    for name, reply in zip(names, pages, strict=True):
        page = as_page(reply)
        link = parse(*page[0]) if page else None
        if link is not None and link.seq >= 1:
            tips[name] = ChainPosition(seq=link.seq, mac=link.mac, id=link.id)
    return tips


async def next_position(redis: aioredis.Redis, stream: str) -> tuple[int, str]:
    """The ``seq`` and ``prev`` a new entry of ``stream`` gets."""
    newest = await last_link(redis, stream)
    if newest is None:
        return 1, GENESIS
    entry_id, link = newest
    if link is None:
        raise AuditError(f"{stream}: its newest entry {entry_id} is not an audit entry (edited)")
    return link.seq + 1, link.mac


class CheckpointLog:
    """Appends checkpoints to a namespace's checkpoint stream."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self.stream = checkpoints_key(namespace)
        self._append = redis.register_script(_APPEND)

    async def append(self, key: bytes, key_id: str, by: str) -> str:
        """Seal and append a checkpoint of every chain's tip; return its entry id."""
        for _ in range(ATTEMPTS):
            seq, prev = await next_position(self.redis, self.stream)
            checkpoint = Checkpoint(
                time=time.time(), by=by, tips=await chain_tips(self.redis, self.namespace)
            )
            data = checkpoint.dump()
            mac = seal(key, self.stream, seq, prev=prev, kid=key_id, data=data)
            try:
                entry_id = await self._append(
                    keys=[self.stream], args=[prev, *entry_fields(seq, prev, key_id, mac, data)]
                )
            except ResponseError as exc:
                if MOVED not in str(exc):
                    raise
                continue  # another checkpoint came first: seal against it
            return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        raise AuditError(f"{self.stream}: other checkpoints kept coming first ({ATTEMPTS} tries)")
