"""A link of an audit chain: one stream entry, sealed together with the one before it.

Every entry of a chain stream, and of the checkpoint stream, has these fields:

``seq``   1, 2, 3 … within its stream
``prev``  the ``mac`` of the entry before (``GENESIS`` for the first)
``kid``   the id of the key that sealed it
``mac``   HMAC-SHA256 over the stream's key, ``seq``, ``prev``, ``kid`` and ``data``, hex
``data``  the record's (or checkpoint's) JSON

Editing any field breaks the entry's own ``mac``; removing, adding or moving an entry breaks the
run of ``seq`` and ``prev``.  The stream's key is sealed in, so an entry cannot be passed off in
another chain or namespace.  Without the key nobody can make a ``mac`` that verifies.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

GENESIS = "0" * 64
"""The ``prev`` of a stream's first entry."""

_DOMAIN = b"agentmesh-audit/1"
PAGE = 500
"""Entries per read: Redis serves a read at once, so a bigger page would stall it longer."""

StreamPage = list[tuple[bytes, dict[bytes, bytes]]]
"""Entries as XRANGE returns them (a client without ``decode_responses``)."""


@dataclass(frozen=True, slots=True)
class Link:
    """One entry as stored: its stream id and fields."""

    id: str
    seq: int
    prev: str
    kid: str
    mac: str
    data: bytes

    def sealed_with(self, key: bytes, stream: str) -> bool:
        """Whether ``mac`` is this entry's seal under ``key``."""
        expected = seal(key, stream, self.seq, prev=self.prev, kid=self.kid, data=self.data)
        return hmac.compare_digest(expected, self.mac)


def seal(key: bytes, stream: str, seq: int, *, prev: str, kid: str, data: bytes) -> str:
    """The ``mac`` of an entry of ``stream`` (its Redis key)."""
    # No field but data may hold a newline, and data comes last: the message is unambiguous.
    message = b"\n".join((_DOMAIN, stream.encode(), b"%d" % seq, prev.encode(), kid.encode(), data))
    return hmac.digest(key, message, "sha256").hex()


def entry_fields(seq: int, prev: str, kid: str, mac: str, data: bytes) -> list[str | bytes]:
    """An entry's field values, in the order the Lua scripts take them."""
    return [str(seq), prev, kid, mac, data]


def parse(entry_id: bytes | str, fields: Mapping[bytes, bytes] | None) -> Link | None:
    """The link an entry holds; ``None`` if its fields are not a link's (edited)."""
    if fields is None:
        return None
    try:
        return Link(
            id=_text(entry_id),
            seq=int(fields[b"seq"]),
            prev=fields[b"prev"].decode(),
            kid=fields[b"kid"].decode(),
            mac=fields[b"mac"].decode(),
            data=fields[b"data"],
        )
    except (KeyError, ValueError):
        return None


async def entries(
    redis: aioredis.Redis, stream: str, start: str = "-", end: str = "+", *, reverse: bool = False
) -> AsyncIterator[tuple[str, Link | None]]:
    """``(entry id, link or None)`` for each entry from ``start`` to ``end``, a page at a time
    (oldest first, or newest first with ``reverse``; a ``(`` before an id excludes it)."""

    async def read(start: str, end: str) -> StreamPage:
        if reverse:
            return as_page(await redis.xrevrange(stream, end, start, count=PAGE))
        return as_page(await redis.xrange(stream, start, end, count=PAGE))

    page = await read(start, end)
    while True:
        following = None
        if len(page) == PAGE:
            # The next page is on its way while the caller works through this one.
            last = f"({_text(page[-1][0])}"
            following = asyncio.ensure_future(read(start, last) if reverse else read(last, end))
        try:
            for entry_id, fields in page:
                yield _text(entry_id), parse(entry_id, fields)
        except BaseException:  # the caller stopped early (GeneratorExit) or failed
            if following is not None:
                following.cancel()
            raise
        if following is None:
            return
        page = await following


async def last_link(redis: aioredis.Redis, stream: str) -> tuple[str, Link | None] | None:
    """The newest entry of ``stream``, or ``None`` if it has none."""
    page = as_page(await redis.xrevrange(stream, "+", "-", count=1))
    if not page:
        return None
    entry_id, fields = page[0]
    return _text(entry_id), parse(entry_id, fields)


def as_page(raw: Any) -> StreamPage:
    """A reply of XRANGE, XREVRANGE or one stream of XREAD, typed."""
    return cast(StreamPage, raw or [])


def id_ms(entry_id: str) -> int:
    """The Redis server time (ms) a stream entry id carries."""
    return int(entry_id.partition("-")[0])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


TIP_LUA = f"""
local function tip_of(stream)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last == 0 then return '{GENESIS}' end
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'mac' then return fields[i + 1] end
  end
  return ''
end
"""
"""Lua: ``tip_of(stream)``, the ``mac`` of a stream's newest entry (``GENESIS`` if none), for
the scripts that append only if the stream still ends where the caller sealed against."""

MOVED = "AUDIT-MOVED"
"""The error those scripts return when the stream ends elsewhere."""
