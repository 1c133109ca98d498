"""The registry in Redis: which agent instances are alive, with which behaviours and capabilities.

Each instance holds a *lease*: ``register`` writes its record and ``heartbeat`` renews the lease
for ``ttl`` seconds. An instance whose lease lapses drops out of every answer at once, with nobody
cleaning up: liveness is read off the record's own expiry (``PEXPIRETIME``, Redis's clock), and
Redis deletes the record itself ``retention`` seconds after the lease lapsed.

Two writers, so that each Redis user writes only what is its own (see "Redis users" in
``docs/architecture.md``): an instance writes its record and its agent's set of instances;
the *indexes* discovery reads are shared by every agent, so only a trusted writer, the gateway,
keeps them (``index``), from the record the instance wrote, when its registry event passes.

Key layout, with ``R = f"{namespace}:registry"`` and ``M = f"{agent}:{instance}"``:

====================== ====== ===================== =========================================
key                    type   written by            holds
====================== ====== ===================== =========================================
``R:inst:M``           string the instance          ``"<lease ms>:<retention ms>:<tag>:<JSON>"``,
                                                    the tag a hash of the JSON; expires
                                                    ``ttl + retention`` after the last heartbeat
``R:agent:<agent>``    set    the agent's instances every ``M`` of the agent
``R:idx:M``            string the gateway           JSON of the indexes ``M`` is in and the tag
                                                    of the record they were taken from
``R:live``             set    the gateway           every indexed ``M``
``R:cap:<capability>`` set    the gateway           the ``M`` with that capability
``R:pat:<pattern>``    set    the gateway           the ``M`` with a behaviour bound with that
                                                    pattern
``R:wild:<prefix>``    set    the gateway           wildcard patterns whose words before the
                                                    first ``*`` or ``#`` are ``<prefix>``
                                                    (``a.b`` for ``a.b.*.c``, empty for ``#``)
====================== ====== ===================== =========================================

An index holds members whose records are gone until the gateway's ``sweep`` (or the leave event)
takes them out; readers skip them, since a member counts only while its record exists.

A query by agent or capability is one Lua call that reads that set and, for each member, the head
of its record (the lease, the retention and a tag that changes whenever the record does) and its
expiry. The client parses a record only for a tag it has not seen, fetching those with one MGET,
and otherwise reuses the record it parsed before (copied with the new heartbeat time once that
changes).

A query by topic first collects the wildcard patterns that could match: those in the buckets of
the topic's prefixes (``""``, ``a``, ``a.b`` and ``a.b.c`` for ``a.b.c``). It keeps those that
:func:`mesh.topology.matches`, then reads the indexes of those patterns and of the topic itself
(a literal binding matches only itself).

Readers never write (their scripts carry the ``no-writes`` flag), so a read-only Redis user or a
replica can serve discovery. The scripts use keys they compute, so the layout needs a single Redis
(not a Redis Cluster).
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
from redis.exceptions import NoScriptError

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


# Shared by the readers: Redis's clock in epoch milliseconds.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The gateway's idx entry of a member is {"t": tag, "k": [index keys], "w": [[bucket,
# pattern, pattern index key], ...]}.  Leaving takes the member out of the indexes not in
# keepkeys; a wildcard pattern nobody else is bound with leaves its bucket too.
_LEAVE = """
local function leave(idx, member, keepkeys)
  for _, key in ipairs(idx.k) do
    if not keepkeys[key] then redis.call('SREM', key, member) end
  end
  for _, w in ipairs(idx.w) do
    if not keepkeys[w[3]] and redis.call('SCARD', w[3]) == 0 then
      redis.call('SREM', w[1], w[2])
    end
  end
end
local function unindex(idxkey, member)
  local old = redis.call('GET', idxkey)
  if old then leave(cjson.decode(old), member, {}) end
  redis.call('DEL', idxkey)
end
"""

# KEYS: record, idx.  ARGV: member, the tag the idx JSON was computed from, idx JSON.
# Returns 1 (indexed), 0 (no record: taken out of the indexes) or -1 (the record changed since
# it was read: read it again).
_INDEX = (
    _LEAVE
    + """
local head = redis.call('GETRANGE', KEYS[1], 0, 63)
local tag = string.match(head, '^%d+:%d+:(%x+):')
if not tag then
  unindex(KEYS[2], ARGV[1])
  return 0
end
if tag ~= ARGV[2] then return -1 end
local idx = cjson.decode(ARGV[3])
local old = redis.call('GET', KEYS[2])
if old then
  local keepkeys = {}
  for _, key in ipairs(idx.k) do keepkeys[key] = true end
  leave(cjson.decode(old), ARGV[1], keepkeys)
end
redis.call('SET', KEYS[2], ARGV[3])
for _, key in ipairs(idx.k) do redis.call('SADD', key, ARGV[1]) end
for _, w in ipairs(idx.w) do redis.call('SADD', w[1], w[2]) end
return 1
"""
)

# KEYS: the live set.  ARGV: key prefix R.  Takes every member whose record is gone out of
# the indexes and of its agent's set; returns how many.
_SWEEP = (
    _LEAVE
    + """
local gone = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. ':inst:' .. member) == 0 then
    unindex(ARGV[1] .. ':idx:' .. member, member)
    redis.call('SREM', KEYS[1], member)
    local agent = string.match(member, '^([^:]+):')
    redis.call('SREM', ARGV[1] .. ':agent:' .. agent, member)
    gone = gone + 1
  end
end
return gone
"""
)

# KEYS: indexes to union.  ARGV: record key prefix, '1' for live entries only.
# Returns one line per hit, "<member> <tag> <heartbeat ms> <1 if alive else 0>", joined by
# newlines: GETRANGE reads only the head of each record, and the client parses the full record
# only when it has not seen that tag (see Registry._fetch).  The heartbeat is when the record's
# expiry was last set: its expiry less the lease and the retention it was written with.
_READ = (
    "#!lua flags=no-writes\n"
    + _NOW
    + """
local out = {}
local seen = {}
for _, key in ipairs(KEYS) do
  for _, member in ipairs(redis.call('SMEMBERS', key)) do
    if not seen[member] then
      seen[member] = true
      local record = ARGV[1] .. member
      local lease, keep, tag = string.match(
        redis.call('GETRANGE', record, 0, 63), '^(%d+):(%d+):(%x+):')
      if lease then
        local ends = redis.call('PEXPIRETIME', record) - tonumber(keep)
        local live = ends > now
        if live or ARGV[2] ~= '1' then
          out[#out + 1] = member .. ' ' .. tag .. ' ' .. string.format('%.0f', ends - lease)
            .. (live and ' 1' or ' 0')
        end
      end
    end
  end
end
return table.concat(out, '\\n')
"""
)

class ReadOnlyScript:
    """A script run with ``EVALSHA_RO``: Redis lets a user run ``EVALSHA`` only on keys it may
    write, but the read-only form on keys it may read, and agents may only read the indexes."""

    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self.redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[str], args: Sequence[str]) -> Any:
        try:
            return await self.redis.evalsha_ro(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.redis.script_load(self.source)
            return await self.redis.evalsha_ro(self.sha, len(keys), *keys, *args)


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
        self._index = redis.register_script(_INDEX)
        self._sweep = redis.register_script(_SWEEP)
        self._read = ReadOnlyScript(redis, _READ)
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

    # -- an instance's own writes -----------------------------------------------------------

    async def register(self, record: InstanceRecord) -> str:
        """Write or replace ``record`` and start a lease of ``ttl`` seconds; its tag.

        Call it again whenever the record changes (a behaviour starts, stops or fails).
        Discovery by capability or topic finds it once the gateway ``index``es it.
        """
        member = self._member(record.agent, record.instance)
        self._index_of(record)  # refuses what cannot be indexed before anything is written
        body = record.model_dump_json(exclude={"heartbeat_at", "alive"})
        tag = hashlib.blake2b(body.encode(), digest_size=8).hexdigest()
        life = self._lease_ms + self._keep_ms
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._record_key(member), f"{self._lease_ms}:{self._keep_ms}:{tag}:{body}")
            pipe.pexpire(self._record_key(member), life)
            pipe.sadd(self._agent_key(record.agent), member)
            pipe.pexpire(self._agent_key(record.agent), life)
            await pipe.execute()
        logger.debug("registered %s", member)
        return tag

    async def heartbeat(self, agent: str, instance: str) -> bool:
        """Renew the instance's lease; False if its record is gone and it must register again."""
        renewed, _ = await self.renew(agent, instance, "")
        return renewed

    async def renew(self, agent: str, instance: str, tag: str) -> tuple[bool, bool]:
        """Renew the instance's lease, in one round trip with asking whether the indexes
        hold its record of ``tag``: (renewed, indexed).  Not renewed: its record is gone."""
        member = self._member(agent, instance)
        life = self._lease_ms + self._keep_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.pexpire(self._record_key(member), life)
            pipe.pexpire(self._agent_key(agent), life)
            pipe.get(self._idx_key(member))
            renewed, _, idx = await pipe.execute()
        if not renewed:
            logger.info("registry record of %s is gone; it must register again", member)
        return bool(renewed), idx is not None and json.loads(idx).get("t") == tag

    async def deregister(self, agent: str, instance: str) -> None:
        """Remove the instance's record at once (a clean shutdown)."""
        member = self._member(agent, instance)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._record_key(member))
            pipe.srem(self._agent_key(agent), member)
            await pipe.execute()
        logger.debug("deregistered %s", member)

    async def indexed(self, agent: str, instance: str, tag: str) -> bool:
        """Whether the indexes hold the instance as its record with ``tag`` describes it."""
        raw = await self.redis.get(self._idx_key(self._member(agent, instance)))
        return raw is not None and json.loads(raw).get("t") == tag

    # -- the gateway's writes ---------------------------------------------------------------

    async def index(self, agent: str, instance: str) -> bool:
        """Make the indexes say what the instance's record says; False when it has none
        (the instance is then taken out of them).

        Only the gateway calls this, for the instance whose registry event it authenticated:
        the indexes are shared by every agent, so no agent may write them.  Raises
        ``ValueError`` for a record that is not the instance's own.
        """
        member = self._member(agent, instance)
        for _ in range(10):
            raw = await self.redis.get(self._record_key(member))
            if raw is None:
                keys = [self._record_key(member), self._idx_key(member)]
                await self._index(keys=keys, args=[member, "", "{}"])
                return False
            _, _, tag, body = _text(raw).split(":", 3)
            record = InstanceRecord.model_validate_json(body)
            if (record.agent, record.instance) != (agent, instance):
                raise ValueError(
                    f"the record of {member} describes {record.agent}:{record.instance}"
                )
            idx = json.dumps({"t": tag, **self._index_of(record)})
            done = await self._index(
                keys=[self._record_key(member), self._idx_key(member)], args=[member, tag, idx]
            )
            if done != -1:
                return bool(done)
        raise RuntimeError(f"the record of {member} kept changing while it was indexed")

    async def sweep(self) -> int:
        """Take instances whose records are gone out of every index; how many."""
        return int(await self._sweep(keys=[f"{self.prefix}:live"], args=[self.prefix]))

    def _index_of(self, record: InstanceRecord) -> dict[str, Any]:
        """The index keys of ``record`` (``k``) and its wildcard buckets (``w``)."""
        member = self._member(record.agent, record.instance)
        patterns = sorted({check_binding(p) for b in record.behaviours for p in b.binding_keys})
        for cap in record.capabilities:
            if not cap:
                raise ValueError(f"instance {member}: capabilities must not be empty strings")
        keys = [f"{self.prefix}:live"]
        keys += [self._cap_key(c) for c in sorted(set(record.capabilities))]
        keys += [self._pattern_key(p) for p in patterns]
        wild = [
            [self._bucket_key(_literal_prefix(p)), p, self._pattern_key(p)]
            for p in patterns
            if _is_wild(p)
        ]
        return {"k": keys, "w": wild}

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
        patterns = await self.redis.sunion(buckets)
        matched = {topic} | {p for p in map(_text, patterns) if matches(p, topic)}
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
            # None: deregistered between the two reads.  Another's identity: a record an
            # instance wrote about someone else, which the registry never shows.
            if base is not None and f"{base.agent}:{base.instance}" == member:
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
                _, _, tag, body = _text(value).split(":", 3)
                tags.append(tag)
                bodies.append(body)
        records = _RECORDS.validate_json(f"[{','.join(bodies)}]")
        self._parsed.update(zip(tags, records, strict=True))
        return {f"{r.agent}:{r.instance}": r for r in records}


def _group(records: Iterable[InstanceRecord]) -> list[AgentRecord]:
    by_agent: dict[str, list[InstanceRecord]] = {}
    for r in records:
        by_agent.setdefault(r.agent, []).append(r)
    return [AgentRecord.of(agent, found) for agent, found in sorted(by_agent.items())]
