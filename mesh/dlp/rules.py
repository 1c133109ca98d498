"""DLP rules as the policy file states them: what to look for, what to do, on which topics.

```yaml
dlp:
  max_payload_bytes: 1048576      # larger payloads are refused unread (default 1 MiB)
  rules:
    - detect: [card, iban]        # built-in detectors, one or a list
      action: redact              # block | redact | alert
      topics: "payments.#"        # topic patterns (default "#": every topic)
    - detect: private_key
      action: block
    - pattern: 'EMP-[0-9]{6}'     # a regular expression of your own
      name: employee_id           # what its findings are called (default "custom")
      action: alert
```

These check each value on its own, with messages naming the bad value.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, field_validator, model_validator

from mesh.dlp.kinds import DETECTORS, Detector
from mesh.filespec import Spec
from mesh.topology import TopicError, check_pattern

Action = Literal["block", "redact", "alert"]
ACTIONS: tuple[Action, ...] = get_args(Action)
DEFAULT_MAX_BYTES = 1024 * 1024
CUSTOM = "custom"
"""What a pattern rule's findings are called when it has no ``name``."""

_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
_GLOBAL_FLAGS = re.compile(r"\(\?([aiLmsu]+)\)")
# A backreference or a conditional on a group: group numbers shift when rules are combined.
_GROUP_REFERENCE = re.compile(r"\\[1-9]|\(\?P=|\(\?\(")
_PROBE = "a A 1 -_.\n"
"""Text to try a pattern on: one that matches nothing here, only in between, is refused."""


def _listed(value: object) -> object:
    # One item may be written without brackets: ``detect: card``.
    return [value] if isinstance(value, str) else value


def _detector(value: object) -> object:
    # Before pydantic's own check, whose message would not name the value.
    if value not in DETECTORS:
        raise ValueError(f"unknown detector {value!r} (expected {', '.join(DETECTORS)})")
    return value


def _topic_pattern(pattern: str) -> str:
    try:
        return check_pattern(pattern)
    except TopicError as exc:
        raise ValueError(str(exc)) from None


def scoped(pattern: str) -> str:
    """``pattern`` as one alternative of a larger pattern: leading global flags such as
    ``(?i)`` become scoped ones, ``(?i:...)``."""
    flags = _GLOBAL_FLAGS.match(pattern)
    if flags is None:
        return f"(?:{pattern})"
    return f"(?{flags.group(1)}:{pattern[flags.end() :]})"


def check_regex(pattern: str) -> str:
    """Return ``pattern`` if a rule may hold it, else raise ``ValueError`` naming it and
    the problem."""
    try:
        compiled = re.compile(scoped(pattern))
    except re.error as exc:
        raise ValueError(f"bad pattern {pattern!r}: {exc}") from None
    if compiled.groupindex:
        raise ValueError(
            f"pattern {pattern!r} names a group, (?P<{next(iter(compiled.groupindex))}>...): "
            "use (...) or (?:...)"
        )
    if _GROUP_REFERENCE.search(pattern.replace("\\\\", "")):
        raise ValueError(
            f"pattern {pattern!r} refers back to a group (\\1, (?P=...), (?(1)...)), "
            "which rules cannot do"
        )
    if compiled.fullmatch("") or any(m.end() == m.start() for m in compiled.finditer(_PROBE)):
        raise ValueError(f"pattern {pattern!r} matches empty text, so it would match anywhere")
    return pattern


Detectors = Annotated[
    list[Annotated[Detector, BeforeValidator(_detector)]], BeforeValidator(_listed)
]
TopicPatterns = Annotated[
    list[Annotated[str, AfterValidator(_topic_pattern)]], BeforeValidator(_listed)
]


class DlpRuleSpec(Spec):
    """What to look for (built-in detectors, or a pattern of your own), the ``action`` on
    a finding, and the topics the rule applies to."""

    detect: Detectors | None = None
    pattern: Annotated[str, AfterValidator(check_regex)] | None = None
    name: str | None = None
    """What a pattern rule's findings are called (``custom`` by default)."""
    action: Action
    topics: TopicPatterns = ["#"]

    @field_validator("action", mode="before")
    @classmethod
    def _action(cls, value: object) -> object:
        if value not in ACTIONS:
            raise ValueError(f"unknown action {value!r} (expected {', '.join(ACTIONS)})")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(
                f"name {value!r} must be lower-case letters, digits and '_', starting with "
                "a letter (at most 64)"
            )
        if value in DETECTORS:
            raise ValueError(f"name {value!r} is a built-in detector's; choose another")
        return value

    @model_validator(mode="after")
    def _what(self) -> DlpRuleSpec:
        if (self.detect is None) == (self.pattern is None):
            raise ValueError("a DLP rule says either detect: DETECTOR(S) or pattern: REGEX")
        if self.detect is not None and not self.detect:
            raise ValueError(f"detect: names no detector (expected {', '.join(DETECTORS)})")
        if self.detect is not None and self.name is not None:
            raise ValueError(
                "name: is for pattern rules; detect rules' findings are named after their detector"
            )
        if not self.topics:
            raise ValueError("topics: names no pattern (leave it out for every topic)")
        return self

    @property
    def kinds(self) -> tuple[str, ...]:
        """What this rule's findings are called: its detectors, or its pattern's name."""
        if self.detect is not None:
            return tuple(self.detect)
        return (self.name or CUSTOM,)


class DlpSpec(Spec):
    """The policy file's ``dlp:`` section: the payload size limit and the rules."""

    max_payload_bytes: int = DEFAULT_MAX_BYTES
    rules: list[DlpRuleSpec] = []

    @field_validator("max_payload_bytes")
    @classmethod
    def _size(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"max_payload_bytes {value} must be at least 1")
        return value
