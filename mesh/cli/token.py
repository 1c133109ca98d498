"""``mesh token``: bearer tokens of the policy's users, kept hashed beside the policy."""

from __future__ import annotations

import click

from mesh.cli.common import echo_json, echo_table, example
from mesh.cli.policy import load_policy_or_exit
from mesh.policy import TokenError, TokenStore

_POLICY = click.option(
    "--policy",
    "policy_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The policy file; the tokens file is beside it (policy.yaml: policy.tokens.json).",
)


def _store(policy_file: str) -> TokenStore:
    return TokenStore.for_policy(load_policy_or_exit(policy_file, 1))


@click.group(
    epilog=example(
        "mesh token issue dashboard --policy examples/policy.yaml",
        "mesh token list --policy examples/policy.yaml",
        "mesh token revoke dashboard --policy examples/policy.yaml",
    )
)
def token() -> None:
    """Issue, revoke and list the bearer tokens of the policy's users (for the bridge)."""


@token.command(epilog=example("mesh token issue dashboard --policy examples/policy.yaml"))
@click.argument("name")
@_POLICY
def issue(name: str, policy_file: str) -> None:
    """Issue a token for user NAME and print it: it is shown this once, only its hash kept.

    NAME must be a principal of kind user; one with a token already must have it revoked
    first.
    """
    store = _store(policy_file)
    try:
        secret = store.issue(name)
    except TokenError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(secret)
    click.echo(
        f"issued a token for {name!r}; it is shown only now (its hash is in {store.path})",
        err=True,
    )


@token.command(epilog=example("mesh token revoke dashboard --policy examples/policy.yaml"))
@click.argument("name")
@_POLICY
def revoke(name: str, policy_file: str) -> None:
    """Revoke user NAME's token: from now on it is refused."""
    store = _store(policy_file)
    try:
        record = store.revoke(name)
    except TokenError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked the token of {name!r} issued {record.created:%Y-%m-%d %H:%M} UTC")


@token.command(
    "list",
    epilog=example(
        "mesh token list --policy examples/policy.yaml",
        "mesh token list --policy examples/policy.yaml --json",
    ),
)
@_POLICY
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def list_tokens(policy_file: str, as_json: bool) -> None:
    """List the tokens issued, revoked ones too (names and dates; never a token)."""
    try:
        records = _store(policy_file).records()
    except TokenError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        echo_json([r.model_dump(mode="json", exclude={"sha256"}) for r in records])
        return
    rows = [("NAME", "ISSUED", "REVOKED")]
    for record in records:
        revoked = f"{record.revoked:%Y-%m-%d %H:%M}" if record.revoked else "-"
        rows.append((record.name, f"{record.created:%Y-%m-%d %H:%M}", revoked))
    echo_table(rows)
