"""The registry in Redis: which agent instances are alive, with which behaviours and capabilities.

Each instance holds a *lease*: ``register`` writes its record and ``heartbeat`` renews the lease
for ``ttl`` seconds. An instance whose lease lapses drops out of every answer at once, with nobody
cleaning up: liveness is judged by comparing each index entry's expiry with the clock, and
Redis deletes the record itself ``retention`` seconds later.

Key layout, with ``R = f"{namespace}:registry"`` and ``M = f"{agent}:{instance}"``:

====================== ====== =========================================================
key                    type   holds
====================== ====== =========================================================
``R:inst:M``           string ``"<lease ms>:<tag>:<record JSON>"``, the tag a hash of the
                              JSON; expires ``ttl + retention`` after the last heartbeat
``R:idx:M``            string JSON of the indexes the instance is in, so a heartbeat
                              renews them without rewriting the record
``R:live``             zset   every ``M``, scored by lease expiry (epoch ms)
``R:agent:<agent>``    zset   the agent's ``M``, scored by lease expiry
``R:cap:<capability>`` zset   the ``M`` with that capability, scored by lease expiry
``R:pat:<pattern>``    zset   the ``M`` with a behaviour bound with that pattern, scored
                              by lease expiry
``R:wild:<prefix>``    zset   wildcard patterns whose words before the first ``*`` or
                              ``#`` are ``<prefix>`` (``a.b`` for ``a.b.*.c``, empty for
                              ``#``), scored by the latest expiry of their instances
====================== ====== =========================================================

A query by agent or capability is one Lua call that reads that index and, for each live entry,
the head of its record: the lease (to tell the heartbeat time) and a tag that changes whenever
the record does. The client parses a record only for a tag it has not seen, fetching those with
one MGET, and otherwise reuses the record it parsed before (copied with the new heartbeat time
once that changes).

A query by topic first collects the wildcard patterns that could match: those in the buckets of
the topic's prefixes (``""``, ``a``, ``a.b`` and ``a.b.c`` for ``a.b.c``). It keeps those that
:func:`mesh.topology.matches`, then reads the indexes of those patterns and of the topic itself
(a literal binding matches only itself).

Time is Redis server time (``TIME`` inside the scripts), for writes and reads alike: agents run on
many hosts whose clocks disagree, and a single clock keeps "alive" the same answer everywhere.

Index entries that lapsed more than ``retention`` ago are pruned by the writers that touch the
index (``register`` and ``heartbeat``); an index nobody renews expires as a whole. Readers never
write (their scripts carry the ``no-writes`` flag), so a read-only Redis user or a replica can
serve discovery.

The scripts use keys they compute, so the layout needs a single Redis (not a Redis Cluster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import socket
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from mesh.topology import TopicError, check_binding, check_name, matches

__all__ = ["AgentRecord", "BehaviourRecord", "InstanceRecord", "Registry"]

logger = logging.getLogger(__name__)

BehaviourState = Literal["created", "running", "stopped", "done", "failed"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class BehaviourRecord(BaseModel):
    """One behaviour of an instance, as the registry shows it."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    state: BehaviourState = "created"
    binding_keys: list[str] = Field(default_factory=list)
    exit_code: int | None = None


class InstanceRecord(BaseModel):
    """One running process of an agent.

    ``heartbeat_at`` and ``alive`` are filled in by the registry when it answers a query (from
    Redis's clock); the values given to :meth:`Registry.register` are ignored.
    """

    model_config = ConfigDict(frozen=True)

    agent: str
    instance: str
    capabilities: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    behaviours: list[BehaviourRecord] = Field(default_factory=list)
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    version: str = ""
    started_at: datetime = Field(default_factory=_utcnow)
    heartbeat_at: datetime = Field(default_factory=_utcnow)
    alive: bool = True
    """Whether the lease was current when the query ran."""

    def receives(self, topic: str) -> list[str]:
        """Names of this instance's behaviours bound to a pattern that matches ``topic``."""
        return [b.name for b in self.behaviours if any(matches(p, topic) for p in b.binding_keys)]


class AgentRecord(BaseModel):
    """An agent and the instances a query found for it."""

    model_config = ConfigDict(frozen=True)

    agent: str
    instances: list[InstanceRecord]
    capabilities: list[str]
    """The union of the instances' capabilities, sorted."""
    alive: bool
    """Whether any instance is alive."""
    last_heartbeat: datetime | None

    @classmethod
    def of(cls, agent: str, instances: Sequence[InstanceRecord]) -> AgentRecord:
        """The record of ``agent`` made of ``instances``."""
        caps = sorted({c for i in instances for c in i.capabilities})
        return cls(
            agent=agent,
            instances=list(instances),
            capabilities=caps,
            alive=any(i.alive for i in instances),
            last_heartbeat=max((i.heartbeat_at for i in instances), default=None),
        )


# Shared by every script: Redis's clock in epoch milliseconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The instance's idx entry is {"l": lease ms, "k": [index keys], "w": [[bucket, pattern,
# pattern index key], ...]}. Renewing sets the lease expiry in every index, prunes entries lapsed
# for longer than the retention, and keeps each index key alive while its newest entry needs it.
_RENEW = """
local function extend(key, life)
  if redis.call('PTTL', key) < life then redis.call('PEXPIRE', key, life) end
end
local function renew(idx, member, now, keep)
  local exp = now + idx.l
  local life = idx.l + keep
  local stale = '(' .. (now - keep)
  for _, key in ipairs(idx.k) do
    redis.call('ZADD', key, exp, member)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', stale)
    extend(key, life)
  end
  for _, w in ipairs(idx.w) do
    redis.call('ZADD', w[1], 'GT', exp, w[2])
    redis.call('ZREMRANGEBYSCORE', w[1], '-inf', stale)
    extend(w[1], life)
  end
end
-- Leave the indexes of idx not in keepkeys; a wildcard pattern nobody else is bound with
-- leaves its bucket too.
local function leave(idx, member, keepkeys)
  for _, key in ipairs(idx.k) do
    if not keepkeys[key] then redis.call('ZREM', key, member) end
  end
  for _, w in ipairs(idx.w) do
    if not keepkeys[w[3]] and redis.call('ZCARD', w[3]) == 0 then
      redis.call('ZREM', w[1], w[2])
    end
  end
end
"""

# KEYS: record, idx.  ARGV: value, member, retention ms, idx JSON.
_REGISTER = (
    _NOW
    + _RENEW
    + """
local idx = cjson.decode(ARGV[4])
local keep = tonumber(ARGV[3])
local old = redis.call('GET', KEYS[2])
if old then
  local keepkeys = {}
  for _, key in ipairs(idx.k) do keepkeys[key] = true end
  leave(cjson.decode(old), ARGV[2], keepkeys)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', idx.l + keep)
redis.call('SET', KEYS[2], ARGV[4], 'PX', idx.l + keep)
renew(idx, ARGV[2], now, keep)
return 1
"""
)

# KEYS: record, idx.  ARGV: member, retention ms.  Returns 0 if the record is gone.
_HEARTBEAT = (
    _NOW
    + _RENEW
    + """
local raw = redis.call('GET', KEYS[2])
if not raw then return 0 end
local idx = cjson.decode(raw)
local keep = tonumber(ARGV[2])
if redis.call('PEXPIRE', KEYS[1], idx.l + keep) == 0 then return 0 end
redis.call('PEXPIRE', KEYS[2], idx.l + keep)
renew(idx, ARGV[1], now, keep)
return 1
"""
)

# KEYS: record, idx.  ARGV: member.
_DEREGISTER = (
    _RENEW
    + """
local raw = redis.call('GET', KEYS[2])
if raw then leave(cjson.decode(raw), ARGV[1], {}) end
return redis.call('DEL', KEYS[1], KEYS[2])
"""
)

# KEYS: indexes to union.  ARGV: record key prefix, '1' for live entries only.
# Returns one line per hit, "<member> <tag> <heartbeat ms> <1 if alive else 0>", joined by
# newlines: GETRANGE reads only the head of each record, and the client parses the full record
# only when it has not seen that tag (see Registry._fetch).
_READ = (
    "#!lua flags=no-writes\n"
    + _NOW
    + """
local low = '-inf'
if ARGV[2] == '1' then low = '(' .. now end
local out = {}
local seen = {}
for _, key in ipairs(KEYS) do
  local hits = redis.call('ZRANGEBYSCORE', key, low, '+inf', 'WITHSCORES')
  for i = 1, #hits, 2 do
    local member = hits[i]
    if not seen[member] then
      seen[member] = true
      local lease, tag = string.match(
        redis.call('GETRANGE', ARGV[1] .. member, 0, 63), '^(%d+):(%x+):')
      if lease then
        local exp = tonumber(hits[i + 1])
        out[#out + 1] = member .. ' ' .. tag .. ' ' .. string.format('%.0f', exp - lease)
          .. (exp > now and ' 1' or ' 0')
      end
    end
  end
end
return table.concat(out, '\\n')
"""
)

# KEYS: wildcard buckets.  ARGV: '1' for patterns with a live instance only.
# Returns the patterns joined by newlines (which patterns cannot contain).
_WILD = (
    "#!lua flags=no-writes\n"
    + _NOW
    + """
local low = '-inf'
if ARGV[1] == '1' then low = '(' .. now end
local out = {}
for _, key in ipairs(KEYS) do
  for _, pattern in ipairs(redis.call('ZRANGEBYSCORE', key, low, '+inf')) do
    out[#out + 1] = pattern
  end
end
return table.concat(out, '\\n')
"""
)

_RECORDS: TypeAdapter[list[InstanceRecord]] = TypeAdapter(list[InstanceRecord])


_by_name = operator.attrgetter("agent", "instance")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _is_wild(pattern: str) -> bool:
    return "*" in pattern or "#" in pattern


def _literal_prefix(pattern: str) -> str:
    """The words of ``pattern`` before its first wildcard: ``a.b`` for ``a.b.*.c``."""
    words = pattern.split(".")
    for i, word in enumerate(words):
        if word in ("*", "#"):
            return ".".join(words[:i])
    return pattern


class Registry:
    """Who is alive in the mesh: register, heartbeat, and discover agent instances.

    ``ttl`` is the lease a registration or heartbeat grants, in seconds; ``retention`` is how
    long a lapsed record is kept so that ``alive=False`` queries can still show it (default
    three leases). Parsed records are kept, up to ``cache_size``, so that discovery parses a
    record only when it changes; the records returned are shared with that cache, so treat
    them as read-only (the models are frozen, but their lists and dicts are not).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        ttl: float,
        *,
        retention: float | None = None,
        cache_size: int = 10_000,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"registry ttl must be positive, got {ttl}")
        self.redis = redis
        self.namespace = namespace
        self.ttl = ttl
        self.retention = 3 * ttl if retention is None else retention
        self.prefix = f"{namespace}:registry"
        self._lease_ms = max(1, round(ttl * 1000))
        self._keep_ms = max(0, round(self.retention * 1000))
        self._register = redis.register_script(_REGISTER)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._deregister = redis.register_script(_DEREGISTER)
        self._read = redis.register_script(_READ)
        self._read_wild = redis.register_script(_WILD)
        self.cache_size = cache_size
        self._parsed: dict[str, InstanceRecord] = {}  # by tag
        self._answers: dict[str, InstanceRecord] = {}  # by line of the read script

    # -- keys -------------------------------------------------------------------------------

    def _record_key(self, member: str) -> str:
        return f"{self.prefix}:inst:{member}"

    def _idx_key(self, member: str) -> str:
        return f"{self.prefix}:idx:{member}"

    def _agent_key(self, agent: str) -> str:
        return f"{self.prefix}:agent:{agent}"

    def _cap_key(self, capability: str) -> str:
        return f"{self.prefix}:cap:{capability}"

    def _pattern_key(self, pattern: str) -> str:
        return f"{self.prefix}:pat:{pattern}"

    def _bucket_key(self, prefix: str) -> str:
        return f"{self.prefix}:wild:{prefix}"

    @staticmethod
    def _member(agent: str, instance: str) -> str:
        # check_name keeps ':' out of both, so the member splits back unambiguously
        return f"{check_name('agent', agent)}:{check_name('instance', instance)}"

    # -- writes -----------------------------------------------------------------------------

    async def register(self, record: InstanceRecord) -> None:
        """Write or replace ``record`` and start a lease of ``ttl`` seconds.

        Call it again whenever the record changes (a behaviour starts, stops or fails).
        """
        member = self._member(record.agent, record.instance)
        patterns = sorted({check_binding(p) for b in record.behaviours for p in b.binding_keys})
        for cap in record.capabilities:
            if not cap:
                raise ValueError(f"instance {member}: capabilities must not be empty strings")
        keys = [f"{self.prefix}:live", self._agent_key(record.agent)]
        keys += [self._cap_key(c) for c in sorted(set(record.capabilities))]
        keys += [self._pattern_key(p) for p in patterns]
        wild = [
            [self._bucket_key(_literal_prefix(p)), p, self._pattern_key(p)]
            for p in patterns
            if _is_wild(p)
        ]
        idx = json.dumps({"l": self._lease_ms, "k": keys, "w": wild})
        body = record.model_dump_json(exclude={"heartbeat_at", "alive"})
        tag = hashlib.blake2b(body.encode(), digest_size=8).hexdigest()
        await self._register(
            keys=[self._record_key(member), self._idx_key(member)],
            args=[f"{self._lease_ms}:{tag}:{body}", member, self._keep_ms, idx],
        )
        logger.debug("registered %s", member)

    async def heartbeat(self, agent: str, instance: str) -> bool:
        """Renew the instance's lease; False if its record is gone and it must register again."""
        member = self._member(agent, instance)
        renewed = await self._heartbeat(
            keys=[self._record_key(member), self._idx_key(member)], args=[member, self._keep_ms]
        )
        if not renewed:
            logger.info("registry record of %s is gone; it must register again", member)
        return bool(renewed)

    async def deregister(self, agent: str, instance: str) -> None:
        """Remove the instance from the registry at once (a clean shutdown)."""
        member = self._member(agent, instance)
        await self._deregister(
            keys=[self._record_key(member), self._idx_key(member)], args=[member]
        )
        logger.debug("deregistered %s", member)

    # -- discovery --------------------------------------------------------------------------

    async def instances(
        self,
        *,
        agent: str | None = None,
        capability: str | None = None,
        topic: str | None = None,
        alive: bool = True,
    ) -> list[InstanceRecord]:
        """Instances matching every filter given, sorted by agent and instance.

        ``topic`` keeps instances with a behaviour bound to a pattern that matches it.
        ``alive=False`` does not filter on liveness: it also returns instances whose lease
        lapsed less than ``retention`` ago (their ``alive`` field is False).
        """
        if topic is not None and _is_wild(topic):
            raise TopicError(f"discovery takes a topic, not a pattern: {topic!r}")
        if agent is None and capability is None and topic is not None:
            found, _ = await self._by_topic(topic, alive)
            return found
        # Read the most selective index; the other filters are checked on the records.
        if agent is not None:
            key = self._agent_key(check_name("agent", agent))
        elif capability is not None:
            key = self._cap_key(capability)
        else:
            key = f"{self.prefix}:live"
        found = await self._fetch([key], alive)
        return [
            r
            for r in found
            if (agent is None or r.agent == agent)
            and (capability is None or capability in r.capabilities)
            and (topic is None or r.receives(topic))
        ]

    async def agents(
        self,
        *,
        capability: str | None = None,
        topic: str | None = None,
        alive: bool = True,
    ) -> list[AgentRecord]:
        """Agents with at least one instance matching the filters, each with those instances."""
        found = await self.instances(capability=capability, topic=topic, alive=alive)
        return _group(found)

    async def agent(self, agent_id: str, *, alive: bool = True) -> AgentRecord | None:
        """The agent and its instances, or None if it has none (alive, unless ``alive=False``)."""
        found = await self.instances(agent=agent_id, alive=alive)
        return AgentRecord.of(agent_id, found) if found else None

    async def receivers(self, topic: str) -> list[tuple[str, str]]:
        """``(agent, behaviour)`` pairs whose live instances have a binding matching ``topic``.

        Judged on binding keys alone, as the broker routes: a stopped behaviour whose queue is
        still bound is listed (its messages wait in the queue).
        """
        if _is_wild(topic):
            raise TopicError(f"discovery takes a topic, not a pattern: {topic!r}")
        found, matched = await self._by_topic(topic, True)
        return sorted(
            {
                (r.agent, b.name)
                for r in found
                for b in r.behaviours
                if not matched.isdisjoint(b.binding_keys)
            }
        )

    async def _by_topic(self, topic: str, alive: bool) -> tuple[list[InstanceRecord], set[str]]:
        """Instances bound to ``topic``, and the binding patterns in the mesh that match it."""
        # A wildcard pattern can match only a topic that starts with its literal prefix, so
        # the candidates are the buckets of the topic's prefixes, not every pattern there is.
        words = topic.split(".")
        buckets = [self._bucket_key(".".join(words[:n])) for n in range(len(words) + 1)]
        joined = _text(await self._read_wild(keys=buckets, args=["1" if alive else "0"]))
        matched = {topic} | {p for p in joined.split("\n") if p and matches(p, topic)}
        # The indexes hold exactly the instances bound with each pattern: no need to check.
        found = await self._fetch([self._pattern_key(p) for p in matched], alive)
        return found, matched

    async def _fetch(self, keys: list[str], alive: bool) -> list[InstanceRecord]:
        # The script answers one line per hit: member, tag (a hash of the stored record),
        # heartbeat time and liveness. A record is read in full and parsed only for a tag not
        # seen before (it changes only when the instance registers again), and the answer for
        # a line is reused until the instance's next heartbeat changes the line. So a query
        # mostly costs one small reply and a dictionary lookup per hit.
        reply = await self._read(keys=keys, args=[f"{self.prefix}:inst:", "1" if alive else "0"])
        lines = [line for line in _text(reply).split("\n") if line]
        # Starting afresh is simpler than LRU, and refilling costs one query's parsing. The
        # caches are replaced, not cleared, so a query awaiting its MGET keeps the ones it saw.
        if len(self._answers) >= self.cache_size:
            self._answers = {}
        if len(self._parsed) >= self.cache_size:
            self._parsed = {}
        answers, parsed = self._answers, self._parsed
        new = [(line, line.split(" ")) for line in lines if line not in answers]
        missing = [member for _, (member, tag, _, _) in new if tag not in parsed]
        fresh = await self._load(missing) if missing else {}
        for line, (member, tag, beat, live) in new:
            base = fresh.get(member) or parsed.get(tag)
            if base is not None:  # else deregistered between the two reads
                heartbeat = datetime.fromtimestamp(int(beat) / 1000, UTC)
                update = {"heartbeat_at": heartbeat, "alive": live == "1"}
                answers[line] = base.model_copy(update=update)
        found = [answers[line] for line in lines if line in answers]
        found.sort(key=_by_name)
        return found

    async def _load(self, members: list[str]) -> dict[str, InstanceRecord]:
        values = await self.redis.mget([self._record_key(m) for m in members])
        tags, bodies = [], []
        for value in values:
            if value is not None:
                _, tag, body = _text(value).split(":", 2)
                tags.append(tag)
                bodies.append(body)
        records = _RECORDS.validate_json(f"[{','.join(bodies)}]")
        self._parsed.update(zip(tags, records, strict=True))
        return {self._member(r.agent, r.instance): r for r in records}


def _group(records: Iterable[InstanceRecord]) -> list[AgentRecord]:
    by_agent: dict[str, list[InstanceRecord]] = {}
    for r in records:
        by_agent.setdefault(r.agent, []).append(r)
    return [AgentRecord.of(agent, found) for agent, found in sorted(by_agent.items())]
