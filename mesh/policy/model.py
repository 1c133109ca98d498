"""The policy file as pydantic models: principals, roles, rule sets and their rules.

These check each value on its own (names, kinds, actions, patterns, globs); what refers to
what (rules to principals and roles, overlapping agent globs) is checked when the policy is
compiled (``mesh.policy.policy``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    BeforeValidator,
    field_validator,
    model_validator,
)

from mesh.dlp import DlpSpec
from mesh.filespec import Name, Names, Spec, check_spec_name, listed, one_of
from mesh.policy.globs import check_glob
from mesh.policy.limits import parse_rate
from mesh.policy.topics import check_rule_pattern
from mesh.topology import TopicError, check_binding, check_pattern

Action = Literal["publish", "subscribe", "request", "reply", "control"]
ACTIONS: tuple[Action, ...] = get_args(Action)
Kind = Literal["agent", "gateway", "bridge", "operator", "user"]
KINDS: tuple[Kind, ...] = get_args(Kind)
Mode = Literal["enforce", "audit"]
MODES: tuple[Mode, ...] = get_args(Mode)
Effect = Literal["allow", "deny"]

EVERYONE = "*"
"""In a rule's ``who``: every principal the policy declares."""

# Checked one by one, so that each bad item is reported at its own line.
Globs = Annotated[list[Annotated[str, AfterValidator(check_glob)]], BeforeValidator(listed)]
Patterns = Annotated[
    list[Annotated[str, AfterValidator(check_rule_pattern)]], BeforeValidator(listed)
]


class PrincipalSpec(Spec):
    """Who acts: agents (by id or glob), the gateway, the bridge, operators, token users."""

    kind: Kind
    agents: Globs | None = None
    """Agent ids or globs this principal connects as; by default its own name.  Users
    (token principals) have none: they act through a delegating principal."""
    delegates: bool | None = None
    """May act on behalf of token principals; by default only the bridge does."""

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, value: object) -> object:
        return one_of("kind", value, KINDS)

    @model_validator(mode="after")
    def _user(self) -> PrincipalSpec:
        if self.kind == "user" and self.agents is not None:
            raise ValueError("a user acts through the bridge with a token: it has no agent ids")
        if self.kind == "user" and self.delegates:
            raise ValueError("a user cannot act on behalf of others (delegates: true)")
        return self


class RequestSpec(Spec):
    """The agents (glob, ``{self}``) and operations (glob) a request rule is about."""

    agent: str = "*"
    operation: str = "*"

    @field_validator("agent", "operation")
    @classmethod
    def _glob(cls, value: str) -> str:
        return check_glob(value, self_allowed=True)


class ControlSpec(Spec):
    """The agents (glob, ``{self}``; ``_all`` is every agent) and commands (glob) a control
    rule is about."""

    agent: str = "*"
    command: str = "*"

    @field_validator("agent", "command")
    @classmethod
    def _glob(cls, value: str) -> str:
        return check_glob(value, self_allowed=True)


class ReplySpec(Spec):
    """The agents (glob, ``{self}``) a reply rule lets one answer."""

    agent: str = "*"

    @field_validator("agent")
    @classmethod
    def _glob(cls, value: str) -> str:
        return check_glob(value, self_allowed=True)


class RuleSpec(Spec):
    """``allow`` or ``deny`` one action to some principals, on some topics or targets."""

    TARGETS: ClassVar[dict[str, str]] = {
        "publish": "topics",
        "subscribe": "topics",
        "request": "request",
        "reply": "reply",
        "control": "control",
    }

    allow: Action | None = None
    deny: Action | None = None
    who: Names
    """Principal and role names, or ``*`` for every principal."""
    topics: Patterns | None = None
    request: RequestSpec | None = None
    reply: ReplySpec | None = None
    control: ControlSpec | None = None

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _action(cls, value: object) -> object:
        return one_of("action", value, ACTIONS)

    @model_validator(mode="after")
    def _target(self) -> RuleSpec:
        if (self.allow is None) == (self.deny is None):
            raise ValueError("a rule says either allow: ACTION or deny: ACTION")
        if not self.who:
            raise ValueError("who: names nobody (principal and role names, or '*' for everyone)")
        target = self.TARGETS[self.action]
        if target == "topics" and not self.topics:
            raise ValueError(f"a {self.action} rule needs topics: [patterns]")
        if target == "request" and self.request is None:
            raise ValueError("a request rule needs request: {agent: GLOB, operation: GLOB}")
        if target == "control" and self.control is None:
            raise ValueError("a control rule needs control: {agent: GLOB, command: GLOB}")
        if target == "reply" and self.reply is None:
            raise ValueError("a reply rule needs reply: {agent: GLOB}")
        for other in ("topics", "request", "reply", "control"):
            if other != target and getattr(self, other) is not None:
                raise ValueError(
                    f"a {self.action} rule names its target with {target}:, not {other}:"
                )
        return self

    @property
    def effect(self) -> Effect:
        return "allow" if self.allow is not None else "deny"

    @property
    def action(self) -> Action:
        action = self.allow or self.deny
        assert action is not None  # one of them, checked above
        return action


class RuleSetSpec(Spec):
    """Rules rolled out together: ``enforce``d, or in ``audit`` (logged, never blocking)."""

    mode: Mode = "enforce"
    rules: list[RuleSpec]

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: object) -> object:
        return one_of("mode", value, MODES)


class SchemaVersionSpec(Spec):
    """One version of a named schema (Draft 2020-12): ``inline`` in the policy, from a
    ``file`` (JSON or YAML, relative to the policy file), or a pydantic ``model``
    (``module:Model``, its JSON Schema)."""

    SOURCES: ClassVar[tuple[str, ...]] = ("inline", "file", "model")

    version: int
    inline: Any = None
    file: str | None = None
    model: str | None = None

    @field_validator("inline")
    @classmethod
    def _inline(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dict | bool):
            raise ValueError(f"a JSON Schema is a mapping or true/false, not {value!r}")
        return value

    @model_validator(mode="after")
    def _source(self) -> SchemaVersionSpec:
        if self.version < 1:
            raise ValueError(f"version {self.version} must be 1 or more")
        given = [name for name in self.SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "a schema version has one source: inline: {JSON Schema}, file: PATH or "
                f"model: module:Model (got {', '.join(given) or 'none'})"
            )
        if self.model is not None:
            module, _, name = self.model.partition(":")
            if not module or not name:
                raise ValueError(f"model {self.model!r} is not of the form module:Model")
        return self

    @property
    def source(self) -> str:
        """Where the schema comes from, as a person would name it."""
        if self.file is not None:
            return f"file {self.file}"
        if self.model is not None:
            return f"model {self.model}"
        return "inline"


def _schema_ref(value: str) -> str:
    # ``name`` (every version) or ``name@version``, as x-mesh-schema names one.
    name, at, version = value.partition("@")
    check_spec_name(name)
    if at and not (version.isdigit() and version[0] != "0"):
        raise ValueError(f"{value!r}: the version after '@' is a number from 1 (reading@2)")
    return value


def _payload_pattern(pattern: str) -> str:
    if pattern.startswith(("_req.", "_reply.", "_err.")):
        raise ValueError(
            f"{pattern!r}: requests take request: {{agent: GLOB, operation: GLOB}}, and "
            "replies are not checked (their routing key does not name the operation)"
        )
    return _mesh_pattern(pattern)


def _mesh_pattern(pattern: str) -> str:
    # User topics, or the mesh's own keys when the pattern names their prefix itself.
    try:
        if pattern.split(".", 1)[0] in ("_registry", "_ctl", "_req"):
            return check_binding(pattern)
        return check_pattern(pattern)
    except TopicError as exc:
        raise ValueError(str(exc)) from None


def _required_pattern(pattern: str) -> str:
    if pattern.startswith(("_reply.", "_err.")):
        raise ValueError(f"{pattern!r}: replies are not checked, so none can be required")
    return _mesh_pattern(pattern)


SchemaRefs = Annotated[
    list[Annotated[str, AfterValidator(_schema_ref)]], BeforeValidator(listed)
]
PayloadPatterns = Annotated[
    list[Annotated[str, AfterValidator(_payload_pattern)]], BeforeValidator(listed)
]
RequiredPatterns = Annotated[
    list[Annotated[str, AfterValidator(_required_pattern)]], BeforeValidator(listed)
]


class PayloadSpec(Spec):
    """Which schemas (``accept``: ``name`` for every version, or ``name@version``) the
    payloads on some topics, or of some request operations, follow."""

    topics: PayloadPatterns | None = None
    request: RequestSpec | None = None
    accept: SchemaRefs

    @model_validator(mode="after")
    def _target(self) -> PayloadSpec:
        if (self.topics is None) == (self.request is None):
            raise ValueError(
                "a payload entry names topics: [patterns] or request: {agent: GLOB, "
                "operation: GLOB}, one of them"
            )
        if self.request is not None and "{self}" in self.request.agent + self.request.operation:
            raise ValueError("{self} stands for the acting agent in rules; schemas apply to all")
        if not self.accept:
            raise ValueError("accept: names no schema (name, or name@version)")
        return self


class SchemasSpec(Spec):
    """Payload schemas: named and versioned ``definitions``, the ``payloads`` that follow
    them, and the topics that ``require`` one."""

    definitions: dict[Name, list[SchemaVersionSpec]] = {}
    """Schema name → its versions."""
    payloads: list[PayloadSpec] = []
    require: RequiredPatterns = []
    """Routing-key patterns whose messages must have a schema; a pattern applies to the
    mesh's own keys (``_req.``, ``_ctl.``, ``_registry.``) only when it starts with one."""


def _topic_pattern(pattern: str) -> str:
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


TopicPatterns = Annotated[
    list[Annotated[str, AfterValidator(_topic_pattern)]], BeforeValidator(listed)
]


class LimitSpec(Spec):
    """One rate limit (``rate_limits`` in the file; ``mesh.policy.limits`` reads rates):
    ``rate`` with ``burst`` for the events ``who`` publishes on ``topics``.

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


class PolicyFile(Spec):
    """The whole file."""

    principals: dict[Name, PrincipalSpec]
    roles: dict[Name, Names] = {}
    """Role name → the principals that hold it."""
    rule_sets: dict[Name, RuleSetSpec] = {}
    schemas: SchemasSpec = SchemasSpec()
    rate_limits: dict[Name, LimitSpec] = {}
    """Limit name → the limit; the name is told to a sender it refuses."""
    dlp: DlpSpec = DlpSpec()
    """Data-loss prevention: what payloads must not carry, and what is done when they do."""
