"""A rate limit as the policy file states it: who, on which topics, how fast, how much at once.

```yaml
rate_limits:
  vehicle-telemetry:            # the limit's name, told to a sender it refuses
    who: vehicles               # principals, roles, or "*" (everyone)
    topics: "vehicle.#"         # topic patterns (default "#": every topic)
    rate: 100/s                 # COUNT/UNIT, UNIT one of s, min, h, d
    burst: 200                  # at most this many at once (default: one second's worth)
    shared: false               # true: one bucket for everyone ``who`` names
```

The model, ``LimitSpec``, is in ``mesh.policy.model`` with the rest of the file's; this
module reads rates.  Whether ``who`` names principals and roles the policy has is checked
where the policy is compiled.
"""

from __future__ import annotations

import re

UNITS: dict[str, float] = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
"""Rate units and their length in seconds."""

_RATE = re.compile(r"^\s*(?P<count>[0-9]+(?:\.[0-9]+)?)\s*/\s*(?P<unit>[a-z]+)\s*$")


def parse_rate(text: str) -> float:
    """Messages per second of a rate such as ``100/s`` or ``6000/min``; ``ValueError``
    naming the problem otherwise."""
    found = _RATE.match(text)
    units = ", ".join(UNITS)
    if found is None or found["unit"] not in UNITS:
        raise ValueError(
            f"rate {text!r} is not COUNT/UNIT with UNIT one of {units} (as in 100/s, 6000/min)"
        )
    count = float(found["count"])
    if count <= 0:
        raise ValueError(f"rate {text!r} must be more than 0")
    return count / UNITS[found["unit"]]
