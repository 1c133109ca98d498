"""Where the audit trail lives in Redis (``<ns>`` is the mesh namespace)::

    <ns>:audit:chains             a set: the name of every chain
    <ns>:audit:chain:<chain>      a stream per chain, appended to by one writer only
    <ns>:audit:checkpoints        a stream of signed checkpoints that tie the chains together

A chain is named ``<replica>.<8 hex digits>``: a writer starts a chain of its own each time it
starts (or when it finds its chain changed under it), so no two writers ever share one.
"""

from __future__ import annotations

import re
import secrets

import redis.asyncio as aioredis

from mesh.topology import check_name

CHECKPOINTS = "_checkpoints"
"""The checkpoint stream's name where chains are named (it cannot be a chain's name)."""


def chains_key(namespace: str) -> str:
    return f"{namespace}:audit:chains"


def chain_key(namespace: str, chain: str) -> str:
    return f"{namespace}:audit:chain:{chain}"


def checkpoints_key(namespace: str) -> str:
    return f"{namespace}:audit:checkpoints"


def stream_key(namespace: str, chain: str) -> str:
    """The stream of ``chain``, the checkpoint stream for ``CHECKPOINTS``."""
    return checkpoints_key(namespace) if chain == CHECKPOINTS else chain_key(namespace, chain)


def new_chain(replica: str) -> str:
    """A fresh chain name for a writer of ``replica``."""
    return f"{check_name('replica', replica)}.{secrets.token_hex(4)}"


async def chain_names(redis: aioredis.Redis, namespace: str, *, scan: bool = True) -> set[str]:
    """Every chain the set lists and every chain stream there is (a stream taken out of the
    set must not escape verification).  ``scan=False``: those the set lists, for a Redis
    user that may not ``SCAN`` (no mesh user may: it lists every key of the server)."""
    names = {_text(raw) for raw in await redis.smembers(chains_key(namespace))}
    if not scan:
        return names
    prefix = chain_key(namespace, "")
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    async for raw in redis.scan_iter(match=pattern, count=1000, _type="stream"):
        names.add(_text(raw)[len(prefix) :])
    return names


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
