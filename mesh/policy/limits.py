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

These check each value on its own; whether ``who`` names principals and roles the policy
has is checked where the policy is compiled.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, field_validator, model_validator

from mesh.policy.model import EVERYONE, Names, Spec
from mesh.topology import TopicError, check_pattern

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


def _pattern(pattern: str) -> str:
    try:
        return check_pattern(pattern)
    except TopicError as exc:
        raise ValueError(str(exc)) from None


def _rate(value: object) -> object:
    # YAML reads ``rate: 100`` as a number: say what is missing rather than "not text".
    if isinstance(value, str):
        parse_rate(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"rate {value!r} needs a unit: {value}/s, {value}/min, ...")
    return value


def _listed(value: object) -> object:
    return [value] if isinstance(value, str) else value


TopicPatterns = Annotated[
    list[Annotated[str, AfterValidator(_pattern)]], BeforeValidator(_listed)
]


class LimitSpec(Spec):
    """One limit: ``rate`` with ``burst`` for the events ``who`` publishes on ``topics``.

    Each principal ``who`` names has a bucket of its own, unless ``shared`` (then all of
    them, a role's members say, share one).  A message is counted against every limit that
    names its sender (or a role of it) and matches its topic, and passes only if all of
    them have room.
    """

    who: Names
    """Principal and role names, or ``*`` for every principal."""
    topics: TopicPatterns = ["#"]
    rate: Annotated[str, BeforeValidator(_rate)]
    burst: int | None = None
    shared: bool = False

    @field_validator("burst")
    @classmethod
    def _burst(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"burst {value} must be at least 1 (the most sent at once)")
        return value

    @model_validator(mode="after")
    def _someone(self) -> LimitSpec:
        if not self.who:
            raise ValueError("who: names nobody (principal and role names, or '*' for everyone)")
        if not self.topics:
            raise ValueError("topics: names no pattern (leave it out for every topic)")
        return self

    @property
    def per_second(self) -> float:
        return parse_rate(self.rate)

    @property
    def capacity(self) -> int:
        """``burst``, or by default one second's worth of the rate (at least 1)."""
        return self.burst if self.burst is not None else max(1, math.floor(self.per_second))

    def describe(self) -> str:
        """The limit in words, for a refused sender: ``100/s for vehicles on vehicle.#``."""
        who = ", ".join("everyone" if w == EVERYONE else w for w in self.who)
        whom = f"shared by {who}" if self.shared else f"for {who}"
        return f"{self.rate.strip()} {whom} on {', '.join(self.topics)}"
