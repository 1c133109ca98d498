"""The policy file: loading with file:line errors, decisions, covers, explain, tokens.

Pure logic: no broker, no Redis.
"""

from __future__ import annotations

import hmac
import itertools
import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from mesh.cli import main
from mesh.policy import (
    Policy,
    PolicyError,
    TokenError,
    TokenStore,
    covers,
    globs,
    load_policy,
    parse_policy,
    tokens_path,
)
from mesh.topology import matches, overlap

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "policy.yaml"

BASE = """\
principals:
  vehicles:
    kind: agent
    agents: ["vehicle-*"]
  v-special:
    kind: agent
    agents: [vehicle-admin]
  monitor:
    kind: agent
  ops:
    kind: operator
    agents: ["client-*"]
  bridge:
    kind: bridge
  alice:
    kind: user
  relay:
    kind: agent
    delegates: true
roles:
  operators: [ops, alice]
rule_sets:
  base:
    rules:
      - allow: publish
        who: vehicles
        topics: "vehicle.{self}.#"
      - deny: publish
        who: vehicles
        topics: "vehicle.*.secret"
      - allow: subscribe
        who: [monitor, alice]
        topics: ["vehicle.#"]
      - deny: subscribe
        who: monitor
        topics: "vehicle.*.secret"
      - allow: request
        who: monitor
        request: {agent: "vehicle-*", operation: status}
      - allow: reply
        who: "*"
        reply: {agent: "*"}
      - allow: control
        who: operators
        control: {agent: "*", command: "*"}
      - allow: control
        who: "*"
        control: {agent: "{self}", command: ping}
      - allow: publish
        who: alice
        topics: "notes.{self}.#"
  rollout:
    mode: audit
    rules:
      - deny: publish
        who: vehicles
        topics: "vehicle.*.debug.#"
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return parse_policy(BASE)


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    return caught.value.lines()


# Loading


def test_the_example_policy_is_valid_and_allows_what_the_demo_does() -> None:
    example = load_policy(EXAMPLE)
    for agent in ("v7", "v8"):
        assert example.decide(agent, "publish", f"vehicle.{agent}.speed").allowed
        assert example.decide(agent, "subscribe", "alerts.speeding.*").allowed
        assert example.decide(agent, "reply", "_reply.client-1.abc").allowed
    assert example.decide("monitor", "subscribe", "vehicle.*.speed").allowed
    assert example.decide("monitor", "publish", "alerts.speeding.v7").allowed
    assert example.decide("gateway", "reply", "_reply.client-1.abc").allowed
    assert example.decide("client-1f2e", "control", "_ctl._all.ping").allowed
    redrive = "_req.gateway.redrive"  # the dashboard's dead-letter panel, mesh dead redrive
    assert example.decide("bridge", "request", redrive, on_behalf_of="dashboard").allowed
    assert example.decide("client-1f2e", "request", redrive).allowed
    assert not example.decide("v7", "publish", "vehicle.v8.speed").allowed
    assert not example.decide("v7", "control", "_ctl.v8.shutdown").allowed
    assert {r.mode for r in example.rules} == {"enforce", "audit"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "principals:\n  v7: {kind: agent}\nrule_sets:\n  telemetry:\n    rules:\n"
            "      - {allow: publish, who: v7, topics: a}\n"
            "      - {allow: publish, who: v7, topics: b}\n"
            "      - allow: publsh\n        who: v7\n        topics: c\n",
            "policy.yaml:8: telemetry rule 3: unknown action 'publsh' "
            "(expected publish, subscribe, request, reply, control)",
            id="unknown action",
        ),
        pytest.param(
            "principals:\n  v7: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow: publish\n        who: v7\n        topcs: a\n",
            "policy.yaml:8: t rule 1: unknown key 'topcs' "
            "(expected allow, deny, who, topics, request, reply, control)",
            id="unknown key in a rule",
        ),
        pytest.param(
            "principals: {}\nrulez: []\n",
            "policy.yaml:2: unknown key 'rulez' (expected principals, roles, rule_sets, schemas, "
            "rate_limits, dlp)",
            id="unknown key at the top",
        ),
        pytest.param(
            "principals:\n  v:\n    kind: agent\n    agents:\n      - ok-*\n      - v.*\n",
            "policy.yaml:6: principal 'v': bad glob 'v.*': it has '.', which no agent id "
            "contains (agent ids are letters, digits, '-' and '_'; globs add *, ? and [...])",
            id="bad glob",
        ),
        pytest.param(
            "principals:\n  v:\n    kind: agent\n    agents: ['v[0-9']\n",
            "policy.yaml:4: principal 'v': bad glob 'v[0-9': it has an unclosed '[' "
            "(agent ids are letters, digits, '-' and '_'; globs add *, ? and [...])",
            id="unclosed bracket",
        ),
        pytest.param(
            "principals:\n  v7: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow: publish\n        who: [v7, ghost]\n        topics: a\n",
            "policy.yaml:7: t rule 1: unknown principal or role 'ghost' (principals: v7)",
            id="rule names a missing principal",
        ),
        pytest.param(
            "principals:\n  v7: {kind: agent}\nroles:\n  ops:\n    - v7\n    - nobody\n",
            "policy.yaml:6: role 'ops': unknown principal 'nobody' (principals: v7)",
            id="role holds a missing principal",
        ),
        pytest.param(
            "principals:\n  v7: {kind: agent}\nroles:\n  v7: [v7]\n",
            "policy.yaml:4: role 'v7': a principal is named 'v7' too: "
            "rules could not tell them apart",
            id="role named like a principal",
        ),
        pytest.param(
            "principals:\n  v7: {kind: agent}\n  v7: {kind: user}\n",
            "policy.yaml:3: principal 'v7': declared twice (first at line 2)",
            id="duplicate principal",
        ),
        pytest.param(
            "principals:\n  v7:\n    kind: agent\n    kind: user\n",
            "policy.yaml:4: principal 'v7': 'kind' appears twice (first at line 3)",
            id="duplicate key",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent, agents: [v7]}\n  b: {kind: agent, agents: [v7]}\n",
            "policy.yaml:3: principal 'b': agent id 'v7' belongs to principal 'a' already (line 2)",
            id="duplicate agent id",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent, agents: ['v*']}\n"
            "  b: {kind: agent, agents: ['x*', '*7']}\n",
            "policy.yaml:3: principal 'b': agent ids matching '*7' may also match 'v*' of "
            "principal 'a' (line 2): make the globs disjoint (an agent id listed as such "
            "wins over any glob)",
            id="ambiguous globs",
        ),
        pytest.param(
            "principals:\n  a: {kind: robot}\n",
            "policy.yaml:2: principal 'a': unknown kind 'robot' "
            "(expected agent, gateway, bridge, operator, user)",
            id="unknown kind",
        ),
        pytest.param(
            "principals:\n  u: {kind: user, agents: [u]}\n",
            "policy.yaml:2: principal 'u': a user acts through the bridge with a token: "
            "it has no agent ids",
            id="user with agent ids",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    mode: audti\n    rules: []\n",
            "policy.yaml:5: rule set 't': unknown mode 'audti' (expected enforce, audit)",
            id="unknown mode",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t: {}\n",
            "policy.yaml:4: rule set 't': missing key 'rules'",
            id="missing key",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow: publish\n        who: a\n        topics: ['x.v{self}']\n",
            "policy.yaml:8: t rule 1: {self} must be a whole word of 'x.v{self}', "
            "as in vehicle.{self}.#",
            id="self inside a word",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow: publish\n        who: a\n        topics: 'x.{me}'\n",
            "policy.yaml:8: t rule 1: unknown placeholder '{me}' in 'x.{me}' (expected {self})",
            id="unknown placeholder",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow: subscribe\n        who: a\n        topics: 'x..y'\n",
            "policy.yaml:8: t rule 1: invalid pattern 'x..y': word '' must be a word, '*' or '#'",
            id="bad topic pattern",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow: request\n        who: a\n        topics: x\n",
            "policy.yaml:6: t rule 1: a request rule needs request: {agent: GLOB, operation: GLOB}",
            id="request without its target",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow: publish\n        who: a\n        topics: x\n"
            "        request: {agent: b}\n",
            "policy.yaml:6: t rule 1: a publish rule names its target with topics:, not request:",
            id="target of another action",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow: control\n        deny: control\n        who: a\n"
            "        control: {}\n",
            "policy.yaml:6: t rule 1: a rule says either allow: ACTION or deny: ACTION",
            id="allow and deny",
        ),
        pytest.param(
            "principals:\n  a:\n    kind: agent\n    agents: 5\n",
            "policy.yaml:4: principal 'a': agents: expected a list, got 5",
            id="wrong type",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent\n",
            "policy.yaml:3: not valid YAML: expected ',' or '}', but got '<stream end>'",
            id="not YAML",
        ),
        pytest.param(
            "",
            "policy.yaml:1: empty policy (expected principals, roles, rule_sets, schemas, "
            "rate_limits, dlp)",
            id="empty",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow: request\n        who: a\n        request: {agent: 5}\n",
            "policy.yaml:8: t rule 1: request.agent: expected text, got 5",
            id="wrong type deep in a rule",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow publish\n",
            "policy.yaml:6: t rule 1: expected a mapping, got 'allow publish'",
            id="rule not a mapping",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
            "      - allow: publish\n        who: []\n        topics: x\n",
            "policy.yaml:6: t rule 1: who: names nobody "
            "(principal and role names, or '*' for everyone)",
            id="rule for nobody",
        ),
        pytest.param(
            "principals:\n  a: {kind: agent}\n  7: {kind: agent}\n",
            "policy.yaml:3: key 7 must be text: quote it ('7')",
            id="key not text",
        ),
        pytest.param(
            "principals:\n  a: \x07\n",
            "policy.yaml:2: not valid YAML: character U+0007 is not allowed "
            "(special characters are not allowed)",
            id="control character",
        ),
        pytest.param(
            "principals: &a\n  x: *a\n",
            "policy.yaml:1: principal 'x': nested too deep (an alias inside itself?)",
            id="recursive alias",
        ),
        pytest.param(
            "- a\n",
            "policy.yaml:1: a policy is a mapping of principals, roles, rule_sets, schemas, "
            "rate_limits, dlp, not ['a']",
            id="not a mapping",
        ),
    ],
)
def test_a_bad_policy_names_file_line_and_reason(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_every_problem_is_reported_in_line_order() -> None:
    text = (
        "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
        "      - allow: publsh\n        who: a\n        topics: x\n"
        "      - allow: publish\n        who: nobody\n        topics: y\n"
    )
    # The unknown principal is found only once the file's shape is right.
    assert problems(text) == [
        "policy.yaml:6: t rule 1: unknown action 'publsh' "
        "(expected publish, subscribe, request, reply, control)"
    ]
    fixed = text.replace("publsh", "publish")
    assert problems(fixed) == [
        "policy.yaml:10: t rule 2: unknown principal or role 'nobody' (principals: a)"
    ]
    several = (
        "principals:\n  a: {kind: agnt}\n  b:\n    kind: agent\n    agents: ['x.y']\n"
        "rule_sets:\n  t:\n    mode: loud\n    rules: []\n"
    )
    assert [line.split(":")[1] for line in problems(several)] == ["2", "5", "8"]


def test_a_policy_not_in_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"principals: {\xff: 1}\n")
    with pytest.raises(PolicyError, match=r"policy.yaml: not UTF-8 text: invalid start byte"):
        load_policy(path)


def test_load_policy_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "prod.yaml"
    path.write_text("principals:\n  a: {kind: robot}\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}:2: principal 'a': unknown kind 'robot'")


# Decisions


def test_deny_by_default(policy: Policy) -> None:
    decision = policy.decide("monitor", "publish", "vehicle.vehicle-1.speed")
    assert not decision.allowed
    assert decision.rule is None
    assert decision.reason == "denied: no rule: denied by default"
    assert not policy.decide("ops-not-a-client", "publish", "a").allowed


def test_an_agent_no_principal_matches_is_denied(policy: Policy) -> None:
    decision = policy.decide("stranger", "reply", "_reply.monitor.i1")
    assert not decision.allowed
    assert decision.reason == "denied: agent 'stranger' is no principal of the policy"


def test_deny_wins_over_allow(policy: Policy) -> None:
    assert policy.decide("vehicle-1", "publish", "vehicle.vehicle-1.speed").allowed
    decision = policy.decide("vehicle-1", "publish", "vehicle.vehicle-1.secret")
    assert not decision.allowed
    assert decision.rule is not None
    assert (decision.rule.rule_set, decision.rule.index) == ("base", 2)
    assert decision.rule.line == BASE.splitlines().index("      - deny: publish") + 1
    assert decision.reason == ("denied by base rule 2 (deny publish vehicle.*.secret for vehicles)")


def test_self_is_the_acting_agents_id(policy: Policy) -> None:
    assert policy.decide("vehicle-1", "publish", "vehicle.vehicle-1.speed").allowed
    assert not policy.decide("vehicle-1", "publish", "vehicle.vehicle-2.speed").allowed
    assert policy.decide("vehicle-2", "publish", "vehicle.vehicle-2.speed").allowed
    # A token principal's {self} is its own name.
    assert policy.decide_for("alice", "publish", "notes.alice.today").allowed
    assert not policy.decide_for("alice", "publish", "notes.bob.today").allowed
    # {self} in a control rule: anyone may ping itself, nobody else.
    assert policy.decide("monitor", "control", "_ctl.monitor.ping").allowed
    assert not policy.decide("monitor", "control", "_ctl.vehicle-1.ping").allowed


def test_agent_globs_resolve_principals_and_an_exact_id_wins(policy: Policy) -> None:
    vehicles = policy.principal_for_agent("vehicle-7")
    assert vehicles is not None
    assert vehicles.name == "vehicles"
    special = policy.principal_for_agent("vehicle-admin")
    assert special is not None
    assert special.name == "v-special"
    monitor = policy.principal_for_agent("monitor")
    assert monitor is not None
    assert monitor.name == "monitor"
    assert policy.principal_for_agent("Vehicle-7") is None  # ids are case-sensitive
    assert policy.principal_for_agent("alice") is None  # users have no agent ids
    assert not policy.decide("vehicle-admin", "publish", "vehicle.vehicle-admin.x").allowed


def test_requests_name_the_target_agent_and_operation(policy: Policy) -> None:
    assert policy.decide("monitor", "request", "_req.vehicle-3.status").allowed
    assert not policy.decide("monitor", "request", "_req.vehicle-3.reboot").allowed
    assert not policy.decide("monitor", "request", "_req.ops.status").allowed
    assert not policy.decide("vehicle-1", "request", "_req.vehicle-3.status").allowed


def test_control_is_for_operators(policy: Policy) -> None:
    for command in ("stop_behaviour", "shutdown"):
        assert policy.decide("client-1", "control", f"_ctl.vehicle-1.{command}").allowed
        assert not policy.decide("monitor", "control", f"_ctl.vehicle-1.{command}").allowed
        assert not policy.decide("vehicle-2", "control", f"_ctl.vehicle-1.{command}").allowed
    assert policy.decide("client-1", "control", "_ctl._all.shutdown").allowed
    assert not policy.decide("monitor", "control", "_ctl._all.ping").allowed
    # A role held by a user reaches through the bridge.
    assert policy.decide(
        "bridge", "control", "_ctl.vehicle-1.shutdown", on_behalf_of="alice"
    ).allowed


def test_replies_and_error_notices(policy: Policy) -> None:
    assert policy.decide("vehicle-1", "reply", "_reply.monitor.abc").allowed
    assert policy.decide("vehicle-1", "reply", "_err.monitor.abc").allowed


def test_audit_mode_reports_what_it_would_deny_and_lets_it_pass(policy: Policy) -> None:
    decision = policy.decide("vehicle-1", "publish", "vehicle.vehicle-1.debug.trace")
    assert decision.allowed
    assert decision.would_deny
    assert decision.mode == "audit"
    assert decision.rule is not None
    assert decision.rule.rule_set == "rollout"
    assert decision.reason == (
        "allowed (audit: would deny by rollout rule 1 "
        "(deny publish vehicle.*.debug.# for vehicles))"
    )
    # What enforced rules deny stays denied; audit rules say nothing about it.
    denied = policy.decide("vehicle-1", "publish", "vehicle.vehicle-2.debug.x")
    assert not denied.allowed
    assert not denied.would_deny
    plain = policy.decide("vehicle-1", "publish", "vehicle.vehicle-1.speed")
    assert (plain.allowed, plain.would_deny, plain.mode) == (True, False, "enforce")


def test_check_notes_audit_rules_that_cannot_act_as_audited() -> None:
    text = BASE + (
        "      - allow: publish\n        who: monitor\n        topics: 'x.#'\n"
        "      - deny: subscribe\n        who: monitor\n        topics: 'vehicle.#'\n"
    )
    notes = parse_policy(text).notes()
    assert notes == [
        "rollout rule 2 (allow publish x.# for monitor): an allow rule in audit mode lets "
        "nothing through until enforced (audit mode reports what deny rules would block)",
        "rollout rule 3 (deny subscribe vehicle.# for monitor): audit mode does not apply "
        "to subscribe: the broker checks it from enforced rules only, so until enforced "
        "this rule is not applied there at all",
    ]
    # Decided all the same, for explain and for the broker-permission compiler.
    decision = parse_policy(text).decide("monitor", "subscribe", "vehicle.*.speed")
    assert (decision.allowed, decision.would_deny) == (True, True)


def test_a_principal_no_rule_names_is_noted() -> None:
    notes = parse_policy(
        "principals:\n  lonely: {kind: agent}\n  gateway: {kind: gateway}\n"
        "  bridge: {kind: bridge}\n"
    ).notes()
    assert notes == ["principal 'lonely': no rule names it or its roles: it may do nothing"]


def test_subscribe_needs_a_covering_allow_and_no_overlapping_deny(policy: Policy) -> None:
    assert policy.decide("monitor", "subscribe", "vehicle.*.speed").allowed
    assert policy.decide("monitor", "subscribe", "vehicle.vehicle-1.#").allowed is False
    decision = policy.decide("monitor", "subscribe", "vehicle.#")
    assert not decision.allowed  # it would deliver vehicle.x.secret too
    assert decision.rule is not None
    assert decision.rule.index == 4
    assert not policy.decide("monitor", "subscribe", "#").allowed  # not covered
    assert not policy.decide("monitor", "subscribe", "vehicle.*.secret").allowed
    # alice has no deny: the whole of vehicle.# is hers.
    assert policy.decide_for("alice", "subscribe", "vehicle.#").allowed


def test_only_delegating_principals_act_for_token_principals(policy: Policy) -> None:
    through_bridge = policy.decide("bridge", "subscribe", "vehicle.#", on_behalf_of="alice")
    assert through_bridge.allowed
    assert through_bridge.principal == "alice"
    assert policy.decide("relay", "subscribe", "vehicle.#", on_behalf_of="alice").allowed
    refused = policy.decide("monitor", "subscribe", "vehicle.*.speed", on_behalf_of="alice")
    assert not refused.allowed
    assert refused.reason == (
        "denied: principal 'monitor' may not act on behalf of others "
        "(only the bridge and principals with delegates: true)"
    )
    not_a_user = policy.decide("bridge", "publish", "x", on_behalf_of="monitor")
    assert not_a_user.reason == "denied: 'monitor' is no token principal (kind user) of the policy"
    # The bridge itself may do nothing the policy does not give it.
    assert not policy.decide("bridge", "subscribe", "vehicle.#").allowed


@pytest.mark.parametrize(
    ("action", "target", "problem"),
    [
        ("publish", "_req.a.b", "invalid topic '_req.a.b'"),
        ("publish", "vehicle.*", "invalid topic 'vehicle.*'"),
        ("subscribe", "a..b", "invalid pattern 'a..b'"),
        ("request", "vehicle-1.status", "a request target is _req.<agent>.<operation>"),
        ("reply", "_req.a.b", "a reply target is _reply.<agent>.<instance> or _err."),
        ("control", "_ctl.v7", "a control target is _ctl.<agent>.<command>"),
        ("control", "_ctl.v.7.x", "a control target is"),
        ("request", "_req.-x.status", "invalid agent '-x'"),
        ("publsh", "a", "unknown action 'publsh'"),
    ],
)
def test_a_target_that_does_not_fit_its_action_is_an_error(
    policy: Policy, action: str, target: str, problem: str
) -> None:
    with pytest.raises(ValueError) as caught:
        policy.decide("vehicle-1", action, target)  # type: ignore[arg-type]
    assert problem in str(caught.value)


def test_decisions_are_computed_once(policy: Policy) -> None:
    first = policy.decide("vehicle-9", "publish", "vehicle.vehicle-9.speed")
    assert policy.decide("vehicle-9", "publish", "vehicle.vehicle-9.speed") is first
    assert policy.principal_for_agent("vehicle-9") is policy.principal_for_agent("vehicle-9")


def test_enforced_subscriptions_expand_self_and_skip_audit_rules() -> None:
    text = BASE + (
        "      - allow: subscribe\n        who: vehicles\n        topics: 'audit.only'\n"
        "  more:\n    rules:\n"
        "      - allow: subscribe\n        who: vehicles\n"
        "        topics: ['cmd.{self}.#', 'alerts.*', 'alerts.*']\n"
    )
    compiled = parse_policy(text)
    assert compiled.enforced_subscriptions("vehicle-4") == ["cmd.vehicle-4.#", "alerts.*"]
    assert compiled.enforced_subscriptions("monitor") == ["vehicle.#"]
    assert compiled.enforced_subscriptions("stranger") == []


def test_principals_lists_every_principal_with_kind_roles_and_delegation(policy: Policy) -> None:
    listed = {p.name: (p.kind, p.agents, p.roles, p.delegates) for p in policy.principals()}
    assert listed == {
        "vehicles": ("agent", ("vehicle-*",), (), False),
        "v-special": ("agent", ("vehicle-admin",), (), False),
        "monitor": ("agent", ("monitor",), (), False),
        "ops": ("operator", ("client-*",), ("operators",), False),
        "bridge": ("bridge", ("bridge",), (), True),
        "alice": ("user", (), ("operators",), False),
        "relay": ("agent", ("relay",), (), True),
    }


# covers and globs


@pytest.mark.parametrize(
    ("rule", "binding", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.*", True),
        ("a.*", "a.#", False),  # a.# also takes "a" and "a.b.c"
        ("a.b", "a.*", False),
        ("#", "#", True),
        ("#", "a.*.#", True),
        ("a.#", "a", True),
        ("a.#", "a.#", True),
        ("a.#", "a.b.#", True),
        ("a.#", "#", False),
        ("a.#", "b.#", False),
        ("*.#", "#.*", True),  # both: one word or more
        ("#.*", "*.#", True),
        ("*.#", "#", True),  # '#' alone matches no word at all, but no topic is empty
        ("*.*.#", "#", False),
        ("vehicle.*.#", "vehicle.#.speed", True),
        ("vehicle.*.speed", "vehicle.#.speed", False),  # vehicle.speed, vehicle.a.b.speed
        ("#.b.#", "a.b.c", True),
        ("#.b.#", "a.#.b", True),
        ("#.b", "#.b.#", False),
        ("*.*", "#.*.*", False),
        ("#.*.*", "*.*", True),
    ],
)
def test_covers(rule: str, binding: str, expected: bool) -> None:
    assert covers(rule, binding) is expected


def _topics(words: str, longest: int) -> list[str]:
    return [".".join(t) for n in range(1, longest + 1) for t in itertools.product(words, repeat=n)]


def test_covers_agrees_with_every_topic_tried() -> None:
    """Against brute force: every pattern of up to three words over a, b, * and #, with
    every topic of up to six words over a, b and c (a word no pattern names)."""
    patterns = [".".join(p) for n in (1, 2, 3) for p in itertools.product("ab*#", repeat=n)]
    topics = _topics("abc", 6)
    matched = {p: frozenset(t for t in topics if matches(p, t)) for p in patterns}
    for rule, binding in itertools.product(patterns, repeat=2):
        assert covers(rule, binding) is (matched[binding] <= matched[rule]), (rule, binding)
        if covers(rule, binding):
            assert overlap(rule, binding) or not matched[binding]


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("v*", "v7", True),
        ("v*", "x*", False),
        ("v*", "*7", True),
        ("v[0-9]*", "vx*", False),
        ("v[0-9]*", "v?", True),
        ("v[!0-9]", "v7", False),
        ("client-*", "v[0-9]*", False),
        ("a*b", "a*c", False),
        ("a*b*", "*c*", True),
    ],
)
def test_glob_overlap(first: str, second: str, expected: bool) -> None:
    assert globs.overlap(first, second) is expected
    assert globs.overlap(second, first) is expected


def test_glob_overlap_agrees_with_every_id_tried() -> None:
    candidates = ["a*", "*b", "a?", "?", "[ab]*", "[!a]*", "*a*b*", "ab", "b*a", "*"]
    ids = ["".join(t) for n in range(1, 6) for t in itertools.product("abc", repeat=n)]
    for first, second in itertools.product(candidates, repeat=2):
        both = any(globs.matches(first, i) and globs.matches(second, i) for i in ids)
        assert globs.overlap(first, second) is both, (first, second)


# mesh policy check / explain


def test_check_prints_a_summary_and_exits_0() -> None:
    result = CliRunner().invoke(main, ["policy", "check", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{EXAMPLE}: valid"
    assert lines[1] == "principals: 6 (agent 2, gateway 1, bridge 1, operator 1, user 1)"
    assert "roles: 2" in lines
    assert "rule sets: 5 (13 rules)" in lines
    assert "  hardening (audit): allow 0, deny 1; publish 1" in lines


def test_check_of_a_bad_file_prints_its_problems_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "principals:\n  a: {kind: agent}\nrule_sets:\n  t:\n    rules:\n"
        "      - allow: publsh\n        who: a\n        topics: x\n"
    )
    result = CliRunner().invoke(main, ["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"{path}:6: t rule 1: unknown action 'publsh' "
        "(expected publish, subscribe, request, reply, control)\n"
    )


@pytest.mark.parametrize(
    ("args", "code", "first_line"),
    [
        (
            ["--as", "v7", "publish", "vehicle.v7.speed"],
            0,
            "allowed by telemetry rule 1 (allow publish vehicle.{self}.# for vehicles)",
        ),
        (["--as", "v7", "publish", "vehicle.v8.speed"], 1, "denied: no rule: denied by default"),
        (
            ["--as", "v7", "publish", "vehicle.v7.debug.trace"],
            0,
            "allowed (audit: would deny by hardening rule 1 "
            "(deny publish vehicle.*.debug.# for vehicles))",
        ),
        (
            ["--as", "monitor", "request", "v7", "--operation", "status"],
            0,
            "allowed by requests rule 1 "
            "(allow request to v[0-9]* operation status for operators, observers)",
        ),
        (["--as", "v7", "control", "v8", "--command", "shutdown"], 1, "denied: no rule"),
        (
            ["--as", "client-3f", "control", "v8", "--command", "shutdown"],
            0,
            "allowed by operations rule 1 (allow control to * command * for operators)",
        ),
        (["--as", "client-3f", "control", "_ctl._all.ping"], 0, "allowed by operations"),
        (["--as", "v7", "reply", "monitor"], 0, "allowed by requests rule 2"),
        (["--as", "dashboard", "subscribe", "alerts.#"], 0, "allowed by telemetry rule 3"),
        (
            ["--as", "bridge", "--on-behalf-of", "dashboard", "subscribe", "vehicle.*.speed"],
            0,
            "allowed by telemetry rule 3",
        ),
        (
            ["--as", "monitor", "--on-behalf-of", "dashboard", "subscribe", "alerts.#"],
            1,
            "denied: principal 'monitor' may not act on behalf of others",
        ),
    ],
)
def test_explain_answers_with_the_deciding_rule_and_an_exit_code(
    args: list[str], code: int, first_line: str
) -> None:
    result = CliRunner().invoke(main, ["policy", "explain", str(EXAMPLE), *args])
    assert result.exit_code == code, result.output
    assert result.stdout.splitlines()[0].startswith(first_line)


def test_explain_names_the_principal_and_the_rules_line() -> None:
    result = CliRunner().invoke(
        main, ["policy", "explain", str(EXAMPLE), "--as", "v7", "publish", "vehicle.v7.speed"]
    )
    # Telemetry rule 1 is the file's first publish rule.
    line = EXAMPLE.read_text().splitlines().index("      - allow: publish") + 1
    assert result.stdout.splitlines()[1] == (
        f"  v7 is principal vehicles (agent); rule at {EXAMPLE}:{line}"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--as", "nobody", "publish", "a"], "'nobody' is neither an agent id"),
        (["--as", "v7", "request", "v8"], "a request needs --operation"),
        (["--as", "v7", "publish", "a", "--operation", "x"], "publish takes no --operation"),
        (["--as", "v7", "publish", "_x"], "invalid topic '_x'"),
        (["--as", "v7", "publsh", "a"], "'publsh' is not one of"),
        (
            ["--as", "dashboard", "--on-behalf-of", "x", "publish", "a"],
            "a user acts on behalf of nobody",
        ),
    ],
)
def test_explain_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["policy", "explain", str(EXAMPLE), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_explain_with_a_bad_policy_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("principals:\n  a: {kind: robot}\n")
    result = CliRunner().invoke(main, ["policy", "explain", str(path), "--as", "a", "publish", "x"])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{path}:2: principal 'a': unknown kind 'robot'")


# Tokens


POLICY_WITH_USERS = "principals:\n  alice: {kind: user}\n  bob: {kind: user}\n  v7: {kind: agent}\n"


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_WITH_USERS)
    return TokenStore.for_policy(load_policy(path))


def test_the_tokens_file_is_beside_the_policy(tmp_path: Path) -> None:
    assert tokens_path(tmp_path / "policy.yaml") == tmp_path / "policy.tokens.json"
    assert tokens_path("conf/prod.yml") == Path("conf/prod.tokens.json")


def test_a_token_verifies_as_its_user_and_only_its_hash_is_kept(store: TokenStore) -> None:
    token = store.issue("alice")
    assert token.startswith("mesh_")
    assert len(token) > 40
    assert store.verify(token) == "alice"
    assert store.verify(token + "x") is None
    assert store.verify("") is None
    text = store.path.read_text()
    assert token not in text
    assert token[5:] not in text
    (record,) = json.loads(text)["tokens"]
    assert set(record) == {"name", "sha256", "created", "revoked"}
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_a_revoked_token_is_refused_at_once_even_by_another_reader(store: TokenStore) -> None:
    token = store.issue("alice")
    reader = TokenStore(store.path, ["alice", "bob"])
    assert reader.verify(token) == "alice"
    revoked = store.revoke("alice")
    assert revoked.revoked is not None
    assert reader.verify(token) is None
    assert store.verify(token) is None
    # A new token may be issued once the old one is revoked.
    again = store.issue("alice")
    assert reader.verify(again) == "alice"
    assert [(r.name, r.revoked is None) for r in reader.records()] == [
        ("alice", False),
        ("alice", True),
    ]


def test_tokens_only_for_users_the_policy_declares(store: TokenStore) -> None:
    with pytest.raises(
        TokenError,
        match=r"'carol' is no token principal of the policy "
        r"\(users: alice, bob\): declare it with kind: user",
    ):
        store.issue("carol")
    with pytest.raises(TokenError, match="'v7' is no token principal"):
        store.issue("v7")
    assert not store.path.exists()


def test_one_live_token_per_user(store: TokenStore) -> None:
    store.issue("bob")
    with pytest.raises(TokenError, match=r"'bob' has a token already .* mesh token revoke bob"):
        store.issue("bob")
    with pytest.raises(TokenError, match="'alice' has no token to revoke"):
        store.revoke("alice")


def test_a_user_removed_from_the_policy_no_longer_verifies(store: TokenStore) -> None:
    token = store.issue("bob")
    assert TokenStore(store.path, ["alice"]).verify(token) is None


def test_verify_compares_every_hash_in_constant_time(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = {name: store.issue(name) for name in ("alice", "bob")}
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert store.verify(tokens["alice"]) == "alice"
    assert len(compared) == 2  # no early exit at the first match
    compared.clear()
    assert store.verify("mesh_guess") is None
    assert len(compared) == 2


def test_token_commands(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_WITH_USERS)
    runner = CliRunner()
    issued = runner.invoke(main, ["token", "issue", "alice", "--policy", str(path)])
    assert issued.exit_code == 0, issued.output
    token = issued.stdout.strip()
    assert "shown only now" in issued.stderr
    store = TokenStore(tokens_path(path), ["alice"])
    assert store.verify(token) == "alice"

    refused = runner.invoke(main, ["token", "issue", "v7", "--policy", str(path)])
    assert refused.exit_code == 1
    assert "'v7' is no token principal" in refused.stderr

    listed = runner.invoke(main, ["token", "list", "--policy", str(path), "--json"])
    assert listed.exit_code == 0
    (entry,) = json.loads(listed.stdout)
    assert entry["name"] == "alice"
    assert "sha256" not in entry
    assert token not in listed.stdout

    revoked = runner.invoke(main, ["token", "revoke", "alice", "--policy", str(path)])
    assert revoked.exit_code == 0, revoked.output
    assert store.verify(token) is None
    table = runner.invoke(main, ["token", "list", "--policy", str(path)])
    assert table.stdout.splitlines()[0].split() == ["NAME", "ISSUED", "REVOKED"]
    assert table.stdout.splitlines()[1].split()[0] == "alice"
    assert runner.invoke(main, ["token", "revoke", "alice", "--policy", str(path)]).exit_code == 1
