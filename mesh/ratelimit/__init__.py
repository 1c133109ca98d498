"""Rate limits: token buckets per principal (or shared by a role) and topic pattern, kept in
Redis so that every gateway replica counts against the same buckets.

``LimitSpec`` is a limit as the policy file states it; ``RateLimiter.take`` decides.
"""

from mesh.policy.limits import UNITS, parse_rate
from mesh.policy.model import LimitSpec
from mesh.ratelimit.limiter import RateLimiter, RateLimitUnavailable, Verdict

__all__ = [
    "UNITS",
    "LimitSpec",
    "RateLimitUnavailable",
    "RateLimiter",
    "Verdict",
    "parse_rate",
]
