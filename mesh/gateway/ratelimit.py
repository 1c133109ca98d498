"""Rate-limit stage: a principal's events pass only while the policy's limits have room.

Runs after ``authorize``, which tied the sender to its principal and accepted any
``x-mesh-on-behalf-of`` (``Passage.principal``).  The limits count the events of the
principal the message is from: the token principal it is sent on behalf of, if any, else
the sender's own.  The
mesh's own traffic (``_…`` keys: requests, replies, control, registry events) is not
limited: a limited reply would only leave its caller waiting out its timeout.

A message over a limit is refused with ``RateLimited``, a ``Denied`` naming the limit and
when to retry.  Redis being unreachable is ``Unavailable``: the gateway waits for it, and
nothing passes unlimited.
"""

from __future__ import annotations

import math
from typing import Any

from mesh.gateway.pipeline import Denied, Passage, Unavailable
from mesh.policy import Policy
from mesh.ratelimit import RateLimiter, RateLimitUnavailable


class RateLimited(Denied):
    """Over limit ``limit``: the sender may try again after ``retry_after_s`` seconds.

    Not a dead letter: the sender is told, and it is its to send again."""

    def __init__(self, stage: str, limit: str, description: str, retry_after_s: float) -> None:
        # Rounded up: a sender retrying at the time it is told must find room.
        wait = math.ceil(retry_after_s * 100) / 100
        super().__init__(stage, f"limit {limit!r} ({description}): retry after {wait:.2f} s")
        self.limit = limit
        self.retry_after_s = retry_after_s

    def notice(self) -> dict[str, Any]:
        return {**super().notice(), "limit": self.limit, "retry_after": self.retry_after_s}


class RateLimit:
    name = "rate-limit"

    def __init__(self, policy: Policy, limiter: RateLimiter) -> None:
        self.policy = policy
        self.limiter = limiter

    async def __call__(self, passage: Passage) -> None:
        topic = passage.routing_key
        if topic.startswith("_"):
            return
        # authorize decided for this principal: the on-behalf-of one, if any
        principal = self.policy.principal(passage.principal or "")
        if principal is None:
            raise Denied(self.name, f"no principal of the policy sent {topic!r}")
        try:
            verdict = await self.limiter.take(principal.name, principal.roles, topic)
        except RateLimitUnavailable as exc:
            raise Unavailable(f"rate limits: {exc}") from exc
        if not verdict.allowed:
            assert verdict.limit_name is not None  # a refusal names its limit
            spec = self.limiter.limits[verdict.limit_name]
            raise RateLimited(
                self.name, verdict.limit_name, spec.describe(), verdict.retry_after_s
            )
