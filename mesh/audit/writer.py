"""The audit writer: one gateway replica's records, appended to a chain of its own, in batches.

``append(record)`` returns once Redis stored the record.  Appends wait in a list that one task
flushes: what arrived while a flush was in flight goes in the next, in one round trip (a Lua
script that checks the chain still ends where the writer sealed against, then XADDs each
record), so many concurrent messages cost few round trips.  Records are sealed in the order
``append`` was called, which is their order in the chain and in the stream.

The writer keeps its chain's newest ``seq`` and ``mac`` in memory.  Should the script find
the chain ending elsewhere (a flush whose reply was lost did land; a trim removed the chain
of a writer idle for longer than ``--keep``), the writer seals the batch again in a new
chain: no seq is ever guessed and no chain has two writers.  A flush that fails fails its
appends with ``AuditUnavailable``; their messages are not acked, and come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from mesh.audit.checkpoint import CheckpointLog
from mesh.audit.errors import AuditError, AuditUnavailable
from mesh.audit.keys import AuditKeys
from mesh.audit.link import GENESIS, MOVED, TIP_LUA, entry_fields, seal
from mesh.audit.record import AuditRecord
from mesh.audit.streams import chain_key, chains_key, new_chain
from mesh.config import Settings

logger = logging.getLogger(__name__)

MAX_BATCH = 512
"""Records per round trip at most: a relay's whole window (512 messages in flight) in one,
and no more (the Lua script blocks Redis while it runs, about a millisecond for 512)."""

# KEYS: the chain's stream, the set of chains.  ARGV: the mac the batch was sealed against,
# the chain's name, then seq, prev, kid, mac and data of each record.  Returns the entry ids.
_APPEND = (
    TIP_LUA
    + f"""
if tip_of(KEYS[1]) ~= ARGV[1] then return redis.error_reply('{MOVED}') end
redis.call('SADD', KEYS[2], ARGV[2])
local ids = {{}}
for i = 3, #ARGV, 5 do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'seq', ARGV[i], 'prev', ARGV[i + 1],
                             'kid', ARGV[i + 2], 'mac', ARGV[i + 3], 'data', ARGV[i + 4])
end
return ids
"""
)

_Pending = tuple[bytes, "asyncio.Future[str]"]


class AuditWriter:
    """Appends ``AuditRecord``s to the chain of one replica; ``start()`` before, ``close()``
    after.  ``chain`` names the chain now written (``<replica>.<8 hex digits>``)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        replica: str,
        key: bytes | str,
        key_id: str,
        *,
        checkpoint_interval: float = 60.0,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.redis = redis
        self.namespace = namespace
        self.replica = replica
        self.chain = new_chain(replica)
        self._key = AuditKeys({key_id: key}, key_id).current
        self._key_id = key_id
        self.checkpoint_interval = checkpoint_interval
        self.max_batch = max_batch
        self.appended = 0
        """Records stored so far."""
        self.batches = 0
        """Round trips that stored them."""
        self._seq = 0
        self._mac = GENESIS
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._running = False
        self._checkpointed = 0
        self._flusher: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._script = redis.register_script(_APPEND)
        self._checkpoints = CheckpointLog(redis, namespace)

    @classmethod
    def from_settings(cls, redis: aioredis.Redis, settings: Settings, replica: str) -> AuditWriter:
        """A writer with the settings' namespace, key and checkpoint interval (``ConfigError``
        if no key is set)."""
        keys = AuditKeys.from_settings(settings)
        key = keys.current  # ConfigError if only older keys are set
        assert keys.current_id is not None
        return cls(
            redis,
            settings.namespace,
            replica,
            key,
            keys.current_id,
            checkpoint_interval=settings.audit_checkpoint_interval,
        )

    def __repr__(self) -> str:
        return f"<AuditWriter chain={self.chain!r} key_id={self._key_id!r}>"

    async def start(self) -> None:
        self._running = True
        self._flusher = asyncio.create_task(self._flush_forever(), name=f"audit {self.chain}")
        self._checkpointer = asyncio.create_task(
            self._checkpoint_forever(), name=f"audit checkpoints {self.chain}"
        )

    async def close(self) -> None:
        """Store what is pending, write a last checkpoint, stop."""
        self._running = False
        self._wake.set()
        if self._flusher is not None:
            await self._flusher
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
        if self.appended != self._checkpointed:
            await self._checkpoint_quietly()

    async def append(self, record: AuditRecord) -> str:
        """Store ``record``; return its stream entry id once Redis has it.

        Raises ``AuditUnavailable`` if Redis did not store it, or cannot say."""
        if not self._running:
            raise AuditError(f"{self!r} is not running")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((record.dump(), future))
        self._wake.set()
        return await future

    async def checkpoint(self) -> str:
        """Seal a checkpoint of every chain's newest record now; return its entry id."""
        marker = self.appended
        entry_id = await self._checkpoints.append(self._key, self._key_id, self.chain)
        self._checkpointed = marker
        return entry_id

    async def _flush_forever(self) -> None:
        while True:
            if not self._pending:
                if not self._running:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                await self._flush(batch)
            except Exception as exc:
                # A flusher that died would leave every later append waiting forever.
                logger.exception("audit writer %s failed to flush", self.chain)
                self._fail(batch, exc)

    async def _flush(self, batch: list[_Pending]) -> None:
        for attempt in (1, 2):
            stream = chain_key(self.namespace, self.chain)
            args: list[str | bytes] = [self._mac, self.chain]
            seq, prev = self._seq, self._mac
            for data, _ in batch:
                seq += 1
                mac = seal(self._key, stream, seq, prev=prev, kid=self._key_id, data=data)
                args += entry_fields(seq, prev, self._key_id, mac, data)
                prev = mac
            try:
                ids = await self._script(keys=[stream, chains_key(self.namespace)], args=args)
            except ResponseError as exc:
                if MOVED in str(exc) and attempt == 1:
                    old = self.chain
                    self._new_chain()
                    logger.warning(
                        "audit chain %s does not end where its writer left it; going on in %s",
                        old,
                        self.chain,
                    )
                    continue
                self._fail(batch, exc)
                return
            except (RedisError, OSError) as exc:
                self._fail(batch, exc)
                return
            self._seq, self._mac = seq, prev
            self.appended += len(batch)
            self.batches += 1
            for (_, future), entry_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(entry_id.decode())
            return

    def _new_chain(self) -> None:
        self.chain = new_chain(self.replica)
        self._seq, self._mac = 0, GENESIS

    def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        error = AuditUnavailable(f"audit records not stored in {self.chain}: {exc}")
        for _, future in batch:
            if not future.done():
                future.set_exception(error)

    async def _checkpoint_forever(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_interval)
            if self.appended != self._checkpointed:
                await self._checkpoint_quietly()

    async def _checkpoint_quietly(self) -> None:
        try:
            await self.checkpoint()
        except (AuditError, RedisError, OSError) as exc:
            logger.warning("audit checkpoint by %s failed: %s", self.chain, exc)
