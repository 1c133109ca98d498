"""``mesh policy``: check a policy file, and ask it what a principal may do."""

from __future__ import annotations

from collections import Counter

import click

from mesh.cli.common import echo_table, example
from mesh.policy import ACTIONS, KINDS, Action, Decision, Policy, PolicyError, load_policy
from mesh.topology import control_key, reply_key, request_key

USAGE_ERROR = 2
"""Exit status when the question cannot be answered (click's own for usage errors)."""

_OPERATION_TARGETS = {"request": request_key, "control": control_key}


def load_policy_or_exit(path: str, status: int) -> Policy:
    """The policy at ``path``; else its problems on stderr, one per line, and exit ``status``."""
    try:
        return load_policy(path)
    except PolicyError as exc:
        for line in exc.lines():
            click.echo(line, err=True)
    except OSError as exc:
        click.echo(f"{path}: cannot read: {exc.strerror}", err=True)
    raise SystemExit(status)


@click.group(
    epilog=example(
        "mesh policy check examples/policy.yaml",
        "mesh policy explain examples/policy.yaml --as v7 publish vehicle.v7.speed",
    )
)
def policy() -> None:
    """Check a policy file, and ask it what a principal may do."""


@policy.command(epilog=example("mesh policy check examples/policy.yaml"))
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False))
def check(policy_file: str) -> None:
    """Validate POLICY_FILE and summarise it: principals, roles, rule counts.

    Each problem is one line, file:line: where: reason.  Exit status: 0 valid, 1 invalid.
    """
    compiled = load_policy_or_exit(policy_file, 1)
    principals = compiled.principals()
    kinds = Counter(p.kind for p in principals)
    click.echo(f"{policy_file}: valid")
    click.echo(
        f"principals: {len(principals)} ("
        + ", ".join(f"{kind} {kinds[kind]}" for kind in KINDS if kinds[kind])
        + ")"
    )
    rows = [("  NAME", "KIND", "AGENTS", "ROLES", "DELEGATES")]
    for p in principals:
        agents = ", ".join(p.agents) or "- (token)"
        delegates = "yes" if p.delegates else "-"
        rows.append((f"  {p.name}", p.kind, agents, ", ".join(p.roles) or "-", delegates))
    echo_table(rows)
    roles = compiled.roles()
    click.echo(f"roles: {len(roles)}")
    for role, members in roles.items():
        click.echo(f"  {role}: {', '.join(members) or '-'}")
    click.echo(f"rule sets: {len(compiled.modes)} ({len(compiled.rules)} rules)")
    for name, mode in compiled.modes.items():
        rules = [r for r in compiled.rules if r.ref.rule_set == name]
        effects = Counter(r.effect for r in rules)
        actions = Counter(r.action for r in rules)
        by_action = ", ".join(f"{a} {actions[a]}" for a in ACTIONS if actions[a])
        click.echo(
            f"  {name} ({mode}): allow {effects['allow']}, deny {effects['deny']}"
            + (f"; {by_action}" if by_action else "")
        )
    schemas = compiled.schemas
    if schemas.declared:
        versions = sum(len(v) for v in schemas.definitions.values())
        click.echo(
            f"schemas: {len(schemas.definitions)} ({_count(versions, 'version')}), "
            f"{_count(len(schemas.rules), 'payload entry', 'payload entries')}"
            + (f"; required on {', '.join(schemas.require)}" if schemas.require else "")
        )
    for name, limit in compiled.rate_limits.items():
        click.echo(f"rate limit {name}: {limit.describe()}, burst {limit.capacity}")
    dlp = compiled.spec.dlp
    if dlp.rules:
        dlp_actions: Counter[str] = Counter(rule.action for rule in dlp.rules)
        click.echo(
            f"dlp: {_count(len(dlp.rules), 'rule')} ("
            + ", ".join(f"{what} {n}" for what, n in sorted(dlp_actions.items()))
            + f"); payloads over {dlp.max_payload_bytes:,} bytes refused"
        )
    notes = compiled.notes()
    if notes:
        click.echo("notes:")
        for note in notes:
            click.echo(f"  {note}")


@policy.command(
    epilog=example(
        "mesh policy explain examples/policy.yaml --as v7 publish vehicle.v7.speed",
        "mesh policy explain examples/policy.yaml --as v7 publish vehicle.v8.speed",
        "mesh policy explain examples/policy.yaml --as monitor subscribe 'vehicle.#'",
        "mesh policy explain examples/policy.yaml --as monitor request v7 --operation status",
        "mesh policy explain examples/policy.yaml --as v7 control v8 --command shutdown",
        "mesh policy explain examples/policy.yaml --as bridge --on-behalf-of dashboard "
        "subscribe 'alerts.#'",
    )
)
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--as", "who", required=True, help="An agent id, or a user (token principal).")
@click.option(
    "--on-behalf-of", default=None, help="A user the agent --as acts for (the bridge does)."
)
@click.argument("action", type=click.Choice(ACTIONS), metavar="ACTION")
@click.argument("target")
@click.option(
    "--operation",
    "--command",
    "operation",
    default=None,
    help="The operation of a request, the command of a control (TARGET is then the agent).",
)
def explain(
    *,
    policy_file: str,
    who: str,
    on_behalf_of: str | None,
    action: Action,
    target: str,
    operation: str | None,
) -> None:
    """May --as do ACTION on TARGET by POLICY_FILE?  Names the rule that decided.

    ACTION is publish, subscribe, request, reply or control.  TARGET is a topic (publish),
    a binding pattern (subscribe), or an agent id (request and control, with --operation;
    reply).  Exit status: 0 allowed (audit-mode rules never
    deny), 1 denied, 2 the question or the policy is wrong.
    """
    compiled = load_policy_or_exit(policy_file, USAGE_ERROR)
    key = _target(action, target, operation)
    principal = compiled.principal_for_agent(who)
    user = compiled.principal(who)
    if principal is None and (user is None or user.kind != "user"):
        raise click.BadParameter(
            f"{who!r} is neither an agent id a principal of the policy matches nor a user",
            param_hint="--as",
        )
    if principal is None and on_behalf_of is not None:
        raise click.BadParameter(
            "a user acts on behalf of nobody: --as names the agent acting for the user",
            param_hint="--on-behalf-of",
        )
    try:
        if principal is not None:
            decision = compiled.decide(who, action, key, on_behalf_of=on_behalf_of)
        else:
            decision = compiled.decide_for(who, action, key)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="TARGET") from None
    click.echo(decision.reason)
    click.echo(f"  {_context(compiled, who, on_behalf_of, decision)}")
    raise SystemExit(0 if decision.allowed else 1)


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _target(action: Action, target: str, operation: str | None) -> str:
    """The target ``decide`` takes: TARGET, or the routing key made of it and --operation."""
    build = _OPERATION_TARGETS.get(action)
    if build is None:
        if operation is not None:
            raise click.BadParameter(f"{action} takes no --operation", param_hint="--operation")
        if action == "reply" and not target.startswith("_"):
            # Replies go to one instance, but no rule names instances: any will do.
            return reply_key(target, "any")
        return target
    if target.startswith("_"):
        return target
    if operation is None:
        raise click.BadParameter(
            f"a {action} needs --operation: TARGET is the agent", param_hint="--operation"
        )
    return build(target, operation)


def _context(compiled: Policy, who: str, on_behalf_of: str | None, decision: Decision) -> str:
    principal = compiled.principal_for_agent(who) or compiled.principal(who)
    assert principal is not None  # --as was resolved before deciding
    acting = f"{who} is principal {principal.name} ({principal.kind})"
    if on_behalf_of is not None:
        acting += f", acting for {on_behalf_of}"
    if decision.rule is not None and decision.rule.line is not None:
        return f"{acting}; rule at {compiled.source}:{decision.rule.line}"
    return acting
