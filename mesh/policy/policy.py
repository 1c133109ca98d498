"""A compiled policy: principals resolved from agent ids, rules indexed per principal and
action, and the queries the gateway, provisioning and ``mesh policy`` ask of it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mesh.dlp import Scanner
from mesh.policy import globs
from mesh.policy.decision import CompiledRule, Decision, RuleRef, parse_target
from mesh.policy.errors import PolicyError, Problem
from mesh.policy.model import (
    ACTIONS,
    EVERYONE,
    Action,
    Kind,
    LimitSpec,
    Mode,
    PolicyFile,
    RuleSpec,
)
from mesh.policy.schemas import compile_schemas
from mesh.policy.topics import expand
from mesh.yamlfile import Location

BROKER_ACTIONS: frozenset[Action] = frozenset({"subscribe"})
"""Actions the broker checks itself (bindings never pass the gateway), from enforced rules
only: audit mode cannot apply to them."""

DECISION_CACHE = 65_536
"""Decisions kept per policy, by (agent, action, target, on behalf of)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who acts.  ``agents`` are the ids and globs it connects as (none for a user, which
    acts with a token through a delegating principal such as the bridge)."""

    name: str
    kind: Kind
    agents: tuple[str, ...]
    roles: tuple[str, ...]
    delegates: bool


@dataclass(frozen=True, slots=True)
class _Rules:
    """The rules about one principal and action, in the order a decision reads them."""

    deny: tuple[CompiledRule, ...]
    allow: tuple[CompiledRule, ...]
    audit_deny: tuple[CompiledRule, ...]


class Policy:
    """One policy, compiled once: ask it who an agent is and what it may do.

    Decisions are deny by default; a matching deny wins over any allow; a rule set in
    ``audit`` mode only reports what it would deny.  ``{self}`` in a rule is the acting
    agent's id (a token principal's own name).  Raises ``PolicyError`` when rules name
    principals or roles the policy lacks, or when two principals' agent globs overlap.
    """

    def __init__(
        self,
        spec: PolicyFile,
        *,
        source: Path | None = None,
        lines: Mapping[Location, int] | None = None,
    ) -> None:
        self.spec = spec
        self.source = source
        self._lines = lines or {}
        self._problems: list[Problem] = []
        self._principals = self._compile_principals()
        self._exact: dict[str, Principal] = {}
        self._globs: list[tuple[str, Principal]] = []
        self._index_agents()
        self.rules: tuple[CompiledRule, ...] = tuple(self._compile_rules())
        base = source.parent if source is not None else Path()
        self.schemas, problems = compile_schemas(spec.schemas, base, self._lines)
        self._problems += problems
        self.rate_limits: dict[str, LimitSpec] = self._check_limits()
        self.scanner = Scanner.from_spec(spec.dlp) if spec.dlp.rules else None
        """Data-loss prevention, ``None`` when the policy has no DLP rules."""
        if self._problems:
            raise PolicyError(self._problems)
        self.modes: dict[str, Mode] = {name: s.mode for name, s in spec.rule_sets.items()}
        self._by_principal = {p.name: self._index_rules(p) for p in self._principals.values()}
        self._decide = lru_cache(maxsize=DECISION_CACHE)(self._decide_uncached)
        self._decide_for = lru_cache(maxsize=DECISION_CACHE)(self._decide_for_uncached)
        self._principal_for = lru_cache(maxsize=DECISION_CACHE)(self._principal_for_uncached)

    # Who

    def principals(self) -> list[Principal]:
        """Every principal, in the order the policy declares them."""
        return list(self._principals.values())

    def principal(self, name: str) -> Principal | None:
        return self._principals.get(name)

    def roles(self) -> dict[str, tuple[str, ...]]:
        """Role name → the principals holding it."""
        return {role: tuple(members) for role, members in self.spec.roles.items()}

    def principal_for_agent(self, agent: str) -> Principal | None:
        """The principal agent id ``agent`` acts as: one listing the id itself, else the one
        whose glob matches (the policy is refused when two principals' globs overlap)."""
        return self._principal_for(agent)

    def _principal_for_uncached(self, agent: str) -> Principal | None:
        principal = self._exact.get(agent)
        if principal is not None:
            return principal
        for glob, candidate in self._globs:
            if globs.matches(glob, agent):
                return candidate
        return None

    # What

    def decide(
        self, agent: str, action: Action, target: str, *, on_behalf_of: str | None = None
    ) -> Decision:
        """May agent id ``agent`` (or, through it, token principal ``on_behalf_of``) do
        ``action`` on ``target``?

        ``target`` is a topic (publish), a binding pattern (subscribe) or the message's
        routing key (``_req.v7.status``, ``_reply.monitor.<instance>``, ``_ctl.v7.shutdown``).
        Raises ``ValueError`` for an unknown action or a target that does not fit it.
        """
        return self._decide(agent, action, target, on_behalf_of)

    def decide_for(
        self, principal: str, action: Action, target: str, *, self_id: str | None = None
    ) -> Decision:
        """As ``decide``, for the principal named ``principal`` with ``{self}`` standing for
        ``self_id`` (by default the principal's name)."""
        return self._decide_for(principal, action, target, self_id)

    def enforced_subscriptions(self, agent: str) -> list[str]:
        """The patterns ``agent`` may bind on ``mesh.topic`` by enforced allow rules, with
        ``{self}`` expanded; an agent no principal matches gets none.

        Deny rules are not taken out: a binding an allowed pattern covers may still overlap
        a deny (``decide(agent, "subscribe", pattern)`` says).
        """
        principal = self.principal_for_agent(agent)
        if principal is None:
            return []
        patterns = (
            expand(pattern, agent)
            for rule in self._by_principal[principal.name]["subscribe"].allow
            for pattern in rule.topics
        )
        return list(dict.fromkeys(patterns))

    def notes(self) -> list[str]:
        """What is valid but may not do what its author meant (``mesh policy check``)."""
        out = []
        for rule in self.rules:
            if rule.mode != "audit":
                continue
            if rule.action in BROKER_ACTIONS:
                out.append(
                    f"{rule.ref}: audit mode does not apply to {rule.action}: the broker "
                    "checks it from enforced rules only, so until enforced this rule is "
                    "not applied there at all"
                )
            elif rule.effect == "allow":
                out.append(
                    f"{rule.ref}: an allow rule in audit mode lets nothing through until "
                    "enforced (audit mode reports what deny rules would block)"
                )
        mentioned = {who for rule in self.rules for who in rule.who}
        for principal in self._principals.values():
            named = {principal.name, *principal.roles, EVERYONE}
            # The gateway relays by its kind; a delegating principal acts for users.
            useful_alone = principal.kind == "gateway" or principal.delegates
            if not useful_alone and not named & mentioned:
                out.append(
                    f"principal {principal.name!r}: no rule names it or its roles: "
                    "it may do nothing"
                )
        return out

    def _decide_uncached(
        self, agent: str, action: Action, target: str, on_behalf_of: str | None
    ) -> Decision:
        principal = self.principal_for_agent(agent)
        if principal is None:
            return Decision(False, note=f"agent {agent!r} is no principal of the policy")
        if on_behalf_of is None:
            return self._decide_for(principal.name, action, target, agent)
        if not principal.delegates:
            return Decision(
                False,
                principal=principal.name,
                note=f"principal {principal.name!r} may not act on behalf of others "
                "(only the bridge and principals with delegates: true)",
            )
        subject = self._principals.get(on_behalf_of)
        if subject is None or subject.kind != "user":
            return Decision(
                False,
                principal=principal.name,
                note=f"{on_behalf_of!r} is no token principal (kind user) of the policy",
            )
        return self._decide_for(subject.name, action, target, None)

    def _decide_for_uncached(
        self, name: str, action: Action, target: str, self_id: str | None
    ) -> Decision:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r} (expected {', '.join(ACTIONS)})")
        parsed = parse_target(action, target)
        principal = self._principals.get(name)
        if principal is None:
            return Decision(False, note=f"{name!r} is no principal of the policy")
        rules = self._by_principal[name][action]
        acting = self_id or name
        for rule in rules.deny:
            if rule.matches(parsed, acting):
                return Decision(False, rule.ref, principal=name)
        allowed_by = next((r for r in rules.allow if r.matches(parsed, acting)), None)
        if allowed_by is None:
            return Decision(False, principal=name)
        for rule in rules.audit_deny:
            if rule.matches(parsed, acting):
                return Decision(True, rule.ref, "audit", would_deny=True, principal=name)
        return Decision(True, allowed_by.ref, principal=name)

    # Compiling

    def _problem(self, path: Location, message: str) -> None:
        self._problems.append(Problem(path, message))

    def _compile_principals(self) -> dict[str, Principal]:
        holds: dict[str, list[str]] = {name: [] for name in self.spec.principals}
        for role, members in self.spec.roles.items():
            if role in self.spec.principals:
                self._problem(
                    ("roles", role),
                    f"a principal is named {role!r} too: rules could not tell them apart",
                )
            for i, member in enumerate(members):
                if member in holds:
                    holds[member].append(role)
                else:
                    self._problem(("roles", role, i), self._unknown("principal", member))
        return {
            name: Principal(
                name=name,
                kind=spec.kind,
                agents=()
                if spec.kind == "user"
                else tuple(spec.agents if spec.agents is not None else [name]),
                roles=tuple(holds[name]),
                delegates=spec.delegates if spec.delegates is not None else spec.kind == "bridge",
            )
            for name, spec in self.spec.principals.items()
        }

    def _index_agents(self) -> None:
        where: dict[str, tuple[Location, Principal]] = {}
        for principal in self._principals.values():
            for i, agent in enumerate(principal.agents):
                path: Location = ("principals", principal.name, "agents", i)
                if agent in where and where[agent][1] is not principal:
                    self._problem(
                        path,
                        f"agent id {agent!r} belongs to principal {where[agent][1].name!r} "
                        f"already{self._at(where[agent][0])}",
                    )
                    continue
                where[agent] = (path, principal)
                if not globs.is_glob(agent):
                    self._exact[agent] = principal
                    continue
                for glob, other in self._globs:
                    if other is not principal and globs.overlap(glob, agent):
                        self._problem(
                            path,
                            f"agent ids matching {agent!r} may also match {glob!r} of principal "
                            f"{other.name!r}{self._at(where[glob][0])}: make the globs disjoint "
                            "(an agent id listed as such wins over any glob)",
                        )
                self._globs.append((agent, principal))

    def _check_limits(self) -> dict[str, LimitSpec]:
        known = set(self.spec.principals) | set(self.spec.roles) | {EVERYONE}
        for name, limit in self.spec.rate_limits.items():
            for i, who in enumerate(limit.who):
                if who not in known:
                    path: Location = ("rate_limits", name, "who", i)
                    self._problem(path, self._unknown("principal or role", who))
        return dict(self.spec.rate_limits)

    def _compile_rules(self) -> list[CompiledRule]:
        known = set(self.spec.principals) | set(self.spec.roles) | {EVERYONE}
        compiled = []
        for set_name, rule_set in self.spec.rule_sets.items():
            for index, rule in enumerate(rule_set.rules, 1):
                path: Location = ("rule_sets", set_name, "rules", index - 1)
                for i, who in enumerate(rule.who):
                    if who not in known:
                        self._problem((*path, "who", i), self._unknown("principal or role", who))
                agent, operation = _globs(rule)
                compiled.append(
                    CompiledRule(
                        ref=RuleRef(set_name, index, _describe(rule), self._lines.get(path)),
                        effect=rule.effect,
                        action=rule.action,
                        mode=rule_set.mode,
                        who=tuple(rule.who),
                        topics=tuple(rule.topics or ()),
                        agent=agent,
                        operation=operation,
                    )
                )
        return compiled

    def _index_rules(self, principal: Principal) -> dict[Action, _Rules]:
        names = {EVERYONE, principal.name, *principal.roles}
        about = [rule for rule in self.rules if names.intersection(rule.who)]
        index = {}
        for action in ACTIONS:
            rules = [r for r in about if r.action == action]
            index[action] = _Rules(
                deny=tuple(r for r in rules if r.effect == "deny" and r.mode == "enforce"),
                allow=tuple(r for r in rules if r.effect == "allow" and r.mode == "enforce"),
                audit_deny=tuple(r for r in rules if r.effect == "deny" and r.mode == "audit"),
            )
        return index

    def _unknown(self, what: str, name: str) -> str:
        declared = ", ".join(self.spec.principals)
        roles = ", ".join(self.spec.roles)
        return f"unknown {what} {name!r} (principals: {declared or 'none'}" + (
            f"; roles: {roles})" if what != "principal" and roles else ")"
        )

    def _at(self, path: Location) -> str:
        line = self._lines.get(path)
        return f" (line {line})" if line is not None else ""


def _globs(rule: RuleSpec) -> tuple[str, str]:
    """The agent and operation (or command) globs of a request, reply or control rule."""
    if rule.request is not None:
        return rule.request.agent, rule.request.operation
    if rule.control is not None:
        return rule.control.agent, rule.control.command
    if rule.reply is not None:
        return rule.reply.agent, "*"
    return "*", "*"


def _describe(rule: RuleSpec) -> str:
    if rule.topics is not None:
        target = ", ".join(rule.topics)
    elif rule.request is not None:
        target = f"to {rule.request.agent} operation {rule.request.operation}"
    elif rule.control is not None:
        target = f"to {rule.control.agent} command {rule.control.command}"
    else:
        assert rule.reply is not None
        target = f"to {rule.reply.agent}"
    return f"{rule.effect} {rule.action} {target} for {', '.join(rule.who)}"
