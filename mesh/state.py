"""Typed agent state in Redis, written with compare-and-set.

Each state lives in a hash at ``f"{namespace}:state:{agent}"`` (or ``…:{agent}:{behaviour}``) with
the fields ``v``, a version that every write increments, ``data``, the JSON of the pydantic
model, and ``w``, the ids of the latest writes (plus ``p`` and ``pe`` while a starved writer holds
priority; see ``_CAS`` for both). A write succeeds only if the version is still the one the change
was computed from; otherwise the change is applied again to the fresh value.

The compare-and-set is a Lua script rather than WATCH/MULTI: it is one round trip per attempt
(WATCH needs WATCH, a read, MULTI and EXEC on a connection held for the whole time), and on a
conflict the script returns the current value, so the retry needs no extra read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mesh.topology import check_name

__all__ = [
    "InvalidState",
    "StateConflict",
    "StateError",
    "StateSlot",
    "StateStore",
    "StateUnavailable",
    "Versioned",
    "state_key",
]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class StateError(Exception):
    """Base of the errors the state store raises."""


class InvalidState(StateError, ValueError):
    """A value does not fit the state model; nothing was written."""


class StateConflict(StateError):
    """Other writers kept changing the state; the update gave up after ``max_attempts``."""


class StateUnavailable(StateError):
    """Redis could not be reached."""


@dataclass(frozen=True, slots=True)
class Versioned(Generic[M]):
    """A state value and the version it was read or written at (0: never written)."""

    value: M
    version: int


def state_key(namespace: str, agent: str, behaviour: str | None = None) -> str:
    """The Redis key of an agent's state, or of one of its behaviours' state."""
    key = f"{namespace}:state:{check_name('agent', agent)}"
    return key if behaviour is None else f"{key}:{check_name('behaviour', behaviour)}"


# KEYS: state.  ARGV: expected version, new data, writer token, '1' to claim priority, claim ms,
# write id, length of 'w'.
# Returns {1, new version}, {0, current version, current data}, or {1, current version, current
# data} when this write id was applied before.
#
# Plain compare-and-set starves: a writer updating in a loop sends its next write the moment its
# reply lands, ahead of the loser's retry, and wins every race. So a writer that has lost a few
# times claims priority (fields 'p', its token, and 'pe', when the claim lapses): until it writes,
# everyone else's write is refused as if stale, and its own next write is certain to succeed.
#
# The same call can arrive twice: a client that retries on a timeout (redis-py's Redis(...) does
# by default) sends it again when only the reply was late. The copy finds the version moved by
# the first and, answered as a conflict, would make update apply the change again. So each
# attempt has a write id, and 'w' keeps the latest ones (' ' before each) so that a copy is
# recognised even after other writers wrote on top.
_CAS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', KEYS[1], 'v', 'p', 'pe', 'w')
local cur = tonumber(f[1] or '0')
local w = f[4] or ''
if cur ~= tonumber(ARGV[1]) and string.find(w, ' ' .. ARGV[6], 1, true) then
  return {1, cur, redis.call('HGET', KEYS[1], 'data')}
end
local free = not f[2] or f[2] == ARGV[3] or tonumber(f[3]) <= now
if cur ~= tonumber(ARGV[1]) or not free then
  if free and ARGV[4] == '1' and cur > 0 then
    redis.call('HSET', KEYS[1], 'p', ARGV[3], 'pe', now + tonumber(ARGV[5]))
  end
  return {0, cur, redis.call('HGET', KEYS[1], 'data')}
end
w = string.sub(w .. ' ' .. ARGV[6], -tonumber(ARGV[7]))
redis.call('HSET', KEYS[1], 'v', cur + 1, 'data', ARGV[2], 'w', w)
if f[2] then redis.call('HDEL', KEYS[1], 'p', 'pe') end
return {1, cur + 1}
"""

# KEYS: state.  ARGV: writer token.  Drops the writer's claim if it still holds one.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'p') == ARGV[1] then redis.call('HDEL', KEYS[1], 'p', 'pe') end
return 1
"""

_CLAIM_AFTER = 2
"""A writer that loses this many attempts in a row claims priority on the key."""

_CLAIM_MS = 200
"""How long a claim holds if its writer never writes (it crashed or gave up)."""

_WRITES_KEPT = 16
"""How many of the latest write ids a state keeps: a late copy of a write is recognised as long
as fewer other writes landed in between."""

_WRITE_ID_BYTES = 8
# Every id has the same length, so keeping the tail of 'w' keeps whole ids.
_W_LENGTH = _WRITES_KEPT * (1 + 2 * _WRITE_ID_BYTES)


class StateStore:
    """Loads and updates pydantic models kept in Redis."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self._cas = redis.register_script(_CAS)
        self._release = redis.register_script(_RELEASE)

    def key(self, agent: str, behaviour: str | None = None) -> str:
        """The key of ``agent``'s state, or of its ``behaviour``'s, in this namespace."""
        return state_key(self.namespace, agent, behaviour)

    async def load(self, key: str, model: type[M]) -> Versioned[M]:
        """The stored value of ``key``; ``model()`` at version 0 if nothing is stored."""
        version, value = await self._read(key, model)
        return Versioned(_defaults(model) if value is None else value, version)

    async def update(
        self,
        key: str,
        model: type[M],
        change: Mapping[str, Any] | Callable[[M], M | Mapping[str, Any]],
        *,
        current: Versioned[M] | None = None,
        max_attempts: int = 32,
    ) -> Versioned[M]:
        """Apply ``change`` to the state at ``key`` and store it if no one wrote in between.

        ``change`` is a mapping of field values, or a function of the current value returning a
        new value or a mapping; it may run more than once, so it should have no side effects.
        Pass ``current`` (a value from ``load``/``update``) to skip the initial read. On a
        conflict the change is re-applied to the fresh value, up to ``max_attempts`` times.

        Raises ``InvalidState`` (nothing written) if the result does not validate, and
        ``StateConflict`` if every attempt lost a race.
        """
        if current is None:
            version, base = await self._read(key, model)
        else:
            version, base = current.version, current.value
        token = secrets.token_hex(8)
        claimed = False
        try:
            for attempt in range(max_attempts):
                value = _apply(model, base, change)
                started = time.monotonic()
                claimed = claimed or attempt + 1 >= _CLAIM_AFTER
                args: list[str | int] = [
                    version,
                    value.model_dump_json(),
                    token,
                    int(claimed),
                    _CLAIM_MS,
                    secrets.token_hex(_WRITE_ID_BYTES),
                    _W_LENGTH,
                ]
                reply = await self._call(self._cas(keys=[key], args=args), writing=True)
                if int(reply[0]) == 1:
                    # With data, a copy of a write applied before: others may have written since.
                    stored = _decode(key, model, reply[2]) if len(reply) > 2 else None
                    return Versioned(value if stored is None else stored, int(reply[1]))
                stale, version = version, int(reply[1])
                base = _decode(key, model, reply[2] if len(reply) > 2 else None)
                logger.debug("state %s changed under us (now v%d); retrying", key, version)
                if version == stale:
                    # Refused though current: another writer holds priority. Give it about a
                    # round trip to write before trying again.
                    await asyncio.sleep((time.monotonic() - started) * random.uniform(0.5, 1.5))
            raise StateConflict(
                f"state {key!r}: gave up after {max_attempts} attempts, "
                "other writers kept changing it"
            )
        except BaseException:
            # A successful write drops the claim; any other way out must not leave it standing.
            if claimed:
                await self._drop_claim(key, token)
            raise

    async def _drop_claim(self, key: str, token: str) -> None:
        # Best effort: a claim left behind lapses by itself after _CLAIM_MS.
        with contextlib.suppress(Exception):
            await self._release(keys=[key], args=[token])

    async def _read(self, key: str, model: type[M]) -> tuple[int, M | None]:
        # Like load, but a missing state without defaults is not an error yet: a mapping
        # change may supply every required field.
        version, data = await self._call(self.redis.hmget(key, ["v", "data"]))
        value = _decode(key, model, data)
        return (0, None) if value is None else (int(version or 0), value)

    async def _call(self, op: Awaitable[T], *, writing: bool = False) -> T:
        try:
            return await op
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # A timeout or a dropped connection can come after Redis applied the write, so a
            # caller that simply calls again may apply its change twice.
            maybe = "; the write may have been applied" if writing else ""
            raise StateUnavailable(
                f"state store: Redis at {_location(self.redis)} is unreachable: {exc}{maybe}"
            ) from exc


def _location(redis: aioredis.Redis) -> str:
    # Built from the connection settings rather than the URL so no password can leak.
    kwargs = redis.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def _decode(key: str, model: type[M], data: bytes | str | None) -> M | None:
    if data is None:
        return None
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise InvalidState(
            f"stored state {key!r} does not fit {model.__name__}: {_describe(exc)}"
        ) from None


def _defaults(model: type[M]) -> M:
    try:
        return model()
    except ValidationError as exc:
        missing = [
            ".".join(str(p) for p in err["loc"]) for err in exc.errors() if err["type"] == "missing"
        ]
        detail = f"fields without defaults: {', '.join(missing)}" if missing else _describe(exc)
        raise InvalidState(
            f"no state stored and {model.__name__}() cannot be built from defaults ({detail}); "
            "give those fields defaults or write the state with a mapping first"
        ) from None


def _apply(
    model: type[M],
    base: M | None,
    change: Mapping[str, Any] | Callable[[M], M | Mapping[str, Any]],
) -> M:
    if isinstance(change, Mapping):
        updates: Mapping[str, Any] = change
        data: dict[str, Any] = {} if base is None else base.model_dump()
    else:
        # A copy, so a change that mutates its argument cannot spoil the value a retry starts from.
        result = change((_defaults(model) if base is None else base).model_copy(deep=True))
        if isinstance(result, model):
            return _validate(model, dict(result))
        if not isinstance(result, Mapping):
            raise TypeError(
                f"a state change must return a {model.__name__} or a mapping, "
                f"not {type(result).__name__}"
            )
        updates = result
        data = {} if base is None else base.model_dump()
    if model.model_config.get("extra") != "allow":
        unknown = sorted(set(updates) - set(model.model_fields))
        if unknown:
            raise InvalidState(f"{model.__name__} has no field {', '.join(map(repr, unknown))}")
    data.update(updates)
    return _validate(model, data)


def _validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidState(f"invalid {model.__name__}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(value)'}: {err['msg']}" for err in exc.errors()
    )


Change = Mapping[str, Any] | Callable[[M], M | Mapping[str, Any]]


class StateSlot(Generic[M]):
    """One agent's (or behaviour's) state: restored on start, updated with compare-and-set.

    ``value`` is the last value read or written by this process; ``update`` re-applies its
    change on top of whatever another replica wrote meanwhile.
    """

    def __init__(self, store: StateStore, key: str, model: type[M]) -> None:
        self.store = store
        self.key = key
        self.model = model
        self._current: Versioned[M] | None = None

    @property
    def value(self) -> M:
        if self._current is None:
            return _defaults(self.model)
        return self._current.value

    @property
    def version(self) -> int | None:
        """The version ``value`` was read or written at; ``None`` before the first read."""
        return None if self._current is None else self._current.version

    async def restore(self) -> M:
        self._current = await self.store.load(self.key, self.model)
        return self._current.value

    async def try_restore(self) -> bool:
        """Restore, or log why not while Redis is unreachable.

        Handling messages matters more than state: the owner goes on with defaults, and
        its first update reads the stored version, so nothing is overwritten blindly.
        """
        try:
            await self.restore()
        except StateUnavailable as exc:
            logger.warning("state %s not restored: %s", self.key, exc)
            return False
        return True

    async def update(self, change: Change[M]) -> M:
        self._current = await self.store.update(self.key, self.model, change, current=self._current)
        return self._current.value


def as_change(change: Change[M] | None, fields: Mapping[str, Any]) -> Change[M]:
    """``update_state``'s arguments, a change or field values, as one change."""
    if change is not None and fields:
        raise TypeError("update_state takes a change or field values, not both")
    return dict(fields) if change is None else change
