"""Trimming the audit trail: records older than a cutoff go, and verification keeps working.

A trim first verifies the whole trail and refuses if it does not verify (removing records
would destroy the evidence).  Then one Lua script, atomically: appends a trim checkpoint whose
``cuts`` name, for each chain and for the checkpoint stream, the last entry removed (so the
first one kept still links to a sealed position), removes every entry older than the cutoff,
and deletes the chains left empty (a replica gone for longer than ``--keep``).  Cuts of chains
still present, or still mentioned by a checkpoint that is kept, are carried forward.

The script appends only if the checkpoint stream still ends where the trim sealed against;
a writer's checkpoint in between makes it seal again.  Writers append meanwhile, but only
after the cutoff (stream ids are Redis time, and a cutoff is never later than Redis' now).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from mesh.audit.checkpoint import ATTEMPTS, ChainPosition, Checkpoint, chain_tips, next_position
from mesh.audit.errors import AuditError, AuditTampered
from mesh.audit.keys import AuditKeys
from mesh.audit.link import MOVED, TIP_LUA, as_page, entry_fields, id_ms, parse, seal
from mesh.audit.streams import CHECKPOINTS, chains_key, checkpoints_key, stream_key
from mesh.audit.verify import VerifyReport, verify_audit

BY = "trim"

# KEYS: the checkpoint stream, the set of chains, then each chain's stream.
# ARGV: the checkpoint stream's newest mac as the trim saw it, the first id to keep, the trim
# checkpoint's seq, prev, kid, mac and data, then each chain's name (as KEYS[3..]).
# Returns {checkpoint id, records removed, checkpoints removed, {chains deleted}}.
_TRIM = (
    TIP_LUA
    + f"""
if tip_of(KEYS[1]) ~= ARGV[1] then return redis.error_reply('{MOVED}') end
local checkpoints = redis.call('XTRIM', KEYS[1], 'MINID', ARGV[2])
local id = redis.call('XADD', KEYS[1], '*', 'seq', ARGV[3], 'prev', ARGV[4], 'kid', ARGV[5],
                      'mac', ARGV[6], 'data', ARGV[7])
local removed = 0
local retired = {{}}
for i = 3, #KEYS do
  removed = removed + redis.call('XTRIM', KEYS[i], 'MINID', ARGV[2])
  if redis.call('XLEN', KEYS[i]) == 0 then
    redis.call('DEL', KEYS[i])
    redis.call('SREM', KEYS[2], ARGV[i + 5])
    retired[#retired + 1] = ARGV[i + 5]
  end
end
return {{id, removed, checkpoints, retired}}
"""
)


@dataclass
class TrimReport:
    before_ms: int
    """Entries older than this Redis time (ms) were removed."""
    removed: int = 0
    """Records removed, in all chains."""
    removed_checkpoints: int = 0
    retired: list[str] = field(default_factory=list)
    """Chains removed whole (no record newer than the cutoff)."""
    checkpoint: str = ""
    """The trim checkpoint's entry id."""
    verified: int = 0
    """Records verified before trimming."""


async def trim(
    redis: aioredis.Redis,
    namespace: str,
    keys: AuditKeys,
    *,
    keep: float | None = None,
    before_ms: int | None = None,
) -> TrimReport:
    """Remove audit records older than ``keep`` seconds (or than Redis time ``before_ms``).

    Raises ``AuditTampered`` (nothing removed) if the trail does not verify first.
    """
    if (keep is None) == (before_ms is None):
        raise ValueError("give keep or before_ms")
    key, key_id = keys.current, _key_id(keys)
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    cutoff = now_ms - round(keep * 1000) if keep is not None else min(before_ms or 0, now_ms)
    verified = await verify_audit(redis, namespace, keys)
    if not verified.ok:
        problems = "; ".join(str(p) for p in verified.problems)
        raise AuditTampered(f"the audit trail does not verify, so nothing was trimmed: {problems}")
    script = redis.register_script(_TRIM)
    stream = checkpoints_key(namespace)
    chains = sorted(r.chain for r in verified.chains if r.records)
    for _ in range(ATTEMPTS):
        seq, prev = await next_position(redis, stream)
        tips = await chain_tips(redis, namespace)
        checkpoint = Checkpoint(
            time=time.time(),
            by=BY,
            tips={chain: tip for chain, tip in tips.items() if id_ms(tip.id) >= cutoff},
            cuts=await _cuts(redis, namespace, verified, chains, cutoff),
            trim=True,
        )
        data = checkpoint.dump()
        mac = seal(key, stream, seq, prev=prev, kid=key_id, data=data)
        try:
            reply = await script(
                keys=[stream, chains_key(namespace), *(stream_key(namespace, c) for c in chains)],
                args=[
                    prev,
                    f"{cutoff}-0",
                    *entry_fields(seq, prev, key_id, mac, data),
                    *chains,
                ],
            )
        except ResponseError as exc:
            if MOVED not in str(exc):
                raise
            continue  # a writer's checkpoint came first: seal against it
        entry_id, removed, removed_checkpoints, retired = reply
        return TrimReport(
            before_ms=cutoff,
            removed=int(removed),
            removed_checkpoints=int(removed_checkpoints),
            retired=[r.decode() for r in retired],
            checkpoint=entry_id.decode(),
            verified=verified.records,
        )
    raise AuditError(f"{stream}: other checkpoints kept coming first ({ATTEMPTS} tries)")


async def _cuts(
    redis: aioredis.Redis,
    namespace: str,
    verified: VerifyReport,
    chains: list[str],
    cutoff: int,
) -> dict[str, ChainPosition]:
    """Each stream's last entry before ``cutoff``, or its cut so far if it keeps all."""
    cuts = {
        chain: cut
        for chain, cut in verified.cuts.items()
        if chain == CHECKPOINTS
        or chain in chains
        or (chain in verified.claims and id_ms(verified.claims[chain].checkpoint) >= cutoff)
    }
    for chain in [CHECKPOINTS, *chains]:
        page = as_page(
            await redis.xrevrange(stream_key(namespace, chain), f"({cutoff}-0", "-", count=1)
        )
        link = parse(*page[0]) if page else None
        if link is not None:
            cuts[chain] = ChainPosition(seq=link.seq, mac=link.mac, id=link.id)
    return cuts


def _key_id(keys: AuditKeys) -> str:
    assert keys.current_id is not None  # keys.current raised otherwise
    return keys.current_id
