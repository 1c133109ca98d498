"""Decisions: what a rule says about one action on one target, and why it was allowed."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.policy import globs
from mesh.policy.model import Action, Effect, Mode
from mesh.policy.topics import covers, expand
from mesh.topology import (
    ALL_AGENTS,
    TopicError,
    check_name,
    check_pattern,
    check_topic,
    matches,
    overlap,
)

DEFAULT_DENY = "no rule: denied by default"


@dataclass(frozen=True, slots=True)
class RuleRef:
    """Which rule: its rule set, its place there (from 1), what it says, its line."""

    rule_set: str
    index: int
    text: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.rule_set} rule {self.index} ({self.text})"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one principal, action and target.

    ``allowed`` is what happens to the message.  ``rule`` decided it (``None``: no rule
    applied, or no principal, see ``note``).  A rule in ``audit`` mode never blocks: when
    one would have denied an allowed message, ``would_deny`` is set and ``rule`` is that
    rule, with ``mode`` ``audit``.
    """

    allowed: bool
    rule: RuleRef | None = None
    mode: Mode = "enforce"
    would_deny: bool = False
    principal: str | None = None
    note: str | None = None

    @property
    def reason(self) -> str:
        """One line for logs and ``mesh policy explain``."""
        if self.would_deny:
            return f"allowed (audit: would deny by {self.rule})"
        if self.rule is not None:
            return f"{'allowed' if self.allowed else 'denied'} by {self.rule}"
        return f"denied: {self.note or DEFAULT_DENY}"


@dataclass(frozen=True, slots=True)
class Target:
    """What an action is about: a topic or binding pattern, or an agent and operation."""

    action: Action
    topic: str = ""
    agent: str = ""
    operation: str = ""


_PREFIXES: dict[Action, tuple[str, ...]] = {
    "request": ("_req",),
    "reply": ("_reply", "_err"),
    "control": ("_ctl",),
}


def parse_target(action: Action, target: str) -> Target:
    """Read ``target`` for ``action``: a topic (publish), a binding pattern (subscribe), or
    the routing key ``_req.<agent>.<operation>``, ``_reply.<agent>.<instance>`` (also
    ``_err.…``) or ``_ctl.<agent>.<command>``.

    Raises ``ValueError`` naming what does not fit.
    """
    try:
        if action == "publish":
            return Target(action, topic=check_topic(target))
        if action == "subscribe":
            return Target(action, topic=check_pattern(target))
    except TopicError as exc:
        raise ValueError(str(exc)) from None
    words = target.split(".")
    prefixes = _PREFIXES[action]
    shapes = " or ".join(f"{p}.<agent>.<{_SECOND[action]}>" for p in prefixes)
    if words[0] not in prefixes or len(words) != 3:
        raise ValueError(f"a {action} target is {shapes}, not {target!r}")
    agent = words[1]
    try:
        if not (action == "control" and agent == ALL_AGENTS):
            check_name("agent", agent)
        for word in words[2:]:
            check_name(_SECOND[action], word)
    except TopicError as exc:
        raise ValueError(f"{target!r}: {exc}") from None
    return Target(action, agent=agent, operation=words[2])


_SECOND: dict[Action, str] = {"request": "operation", "reply": "instance", "control": "command"}


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule, ready to match targets: topic patterns, or agent and operation globs."""

    ref: RuleRef
    effect: Effect
    action: Action
    mode: Mode
    who: tuple[str, ...]
    topics: tuple[str, ...] = ()
    agent: str = "*"
    operation: str = "*"

    def matches(self, target: Target, self_id: str) -> bool:
        """Whether this rule is about ``target`` when ``self_id`` acts.

        A subscribe rule that allows covers the whole binding; one that denies need only
        overlap it (deny wins: a binding that could deliver one denied topic is denied).
        """
        if self.action == "publish":
            return any(matches(expand(p, self_id), target.topic) for p in self.topics)
        if self.action == "subscribe":
            fits = covers if self.effect == "allow" else overlap
            return any(fits(expand(p, self_id), target.topic) for p in self.topics)
        return globs.matches(expand(self.agent, self_id), target.agent) and (
            self.action == "reply"
            or globs.matches(expand(self.operation, self_id), target.operation)
        )
