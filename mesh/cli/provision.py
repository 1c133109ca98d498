"""``mesh provision``: the broker users, permissions and credentials a policy file wants."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import click
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mesh.cli.common import example, settings_or_exit
from mesh.cli.policy import load_policy_or_exit
from mesh.config import Settings
from mesh.management import ManagementAPI, ManagementError, vhost_of
from mesh.policy import Policy
from mesh.provision import (
    Change,
    CredentialStore,
    Plan,
    ProvisionError,
    build_plan,
    credentials_dir,
    definitions,
    dumps,
    mesh_objects,
)
from mesh.provision import provision as provision_plan
from mesh.provision.credentials import write_private
from mesh.tls import redis_tls_options


@click.command(
    epilog=example(
        "mesh provision examples/policy.yaml --dry-run",
        "mesh provision examples/policy.yaml",
        "mesh provision examples/policy.yaml --credentials ~/.mesh/prod --definitions defs.json",
        "mesh provision examples/policy.yaml --no-broker --definitions defs.json",
    )
)
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the changes; make none.")
@click.option(
    "--credentials",
    type=click.Path(file_okay=False),
    default=None,
    help="The credentials directory (default: $MESH_CREDENTIALS_DIR, else .mesh-credentials "
    "beside POLICY_FILE).",
)
@click.option(
    "--definitions",
    "definitions_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write a RabbitMQ definitions file (JSON, mode 0600) for a broker to import.",
)
@click.option(
    "--no-broker",
    is_flag=True,
    help="Contact neither the broker nor Redis: write the credentials (and --definitions) only.",
)
def provision(
    policy_file: str,
    dry_run: bool,
    credentials: str | None,
    definitions_file: str | None,
    no_broker: bool,
) -> None:
    """Create or update the broker and Redis users POLICY_FILE wants; delete those it no
    longer names.

    One RabbitMQ user per principal that connects (agents, gateway, bridge, operators):
    <namespace>.<principal> (MESH_NAMESPACE, default mesh), tagged mesh-managed and
    mesh-namespace:<namespace>, with permissions and topic permissions on the vhost of
    MESH_AMQP_URL.  A user without both tags, or of another namespace, is never touched.
    Token users get none: they act through the bridge.  The mesh's shared exchanges and
    queues, which agents may not declare, are declared where missing.

    And a Redis ACL user of the same name at MESH_REDIS_URL, marked with the channel
    pattern mesh-managed:<namespace>: an agent's may use only its own state and registry
    entry and read the registry; the gateway's and operators' every key of the mesh.

    Passwords are generated once and kept in <principal>.env (MESH_AMQP_URL,
    MESH_REDIS_URL and MESH_NAMESPACE, mode 0600) in the credentials directory: rerunning
    keeps them.  Each change is one line; "nothing to change" when there is none.

    Runs as a broker administrator: the user of MESH_MANAGEMENT_URL (by default
    MESH_AMQP_URL's user, on port 15672), guest on a local broker; and as a Redis user
    allowed ACL SETUSER (the default user of a local Redis).
    """
    settings = settings_or_exit()
    compiled = load_policy_or_exit(policy_file, 1)
    store = CredentialStore(credentials_dir(policy_file, credentials))
    plan = provision_policy(
        compiled, store, settings, dry_run=dry_run, no_broker=no_broker, echo=click.echo
    )
    if definitions_file is not None:
        _definitions(Path(definitions_file), plan, store, dry_run=dry_run)
    if dry_run:
        click.echo("dry run: nothing changed")


def provision_policy(
    compiled: Policy,
    store: CredentialStore,
    settings: Settings,
    *,
    dry_run: bool = False,
    no_broker: bool = False,
    echo: Callable[[str], None],
) -> Plan:
    """What ``mesh provision`` does (``mesh up`` too): make the users ``compiled`` wants,
    keep their credentials in ``store``, say each change with ``echo``.  Failures raise
    ``click.ClickException`` saying what to do."""
    api = None if no_broker else ManagementAPI.for_settings(settings)
    redis = None if no_broker else aioredis.Redis.from_url(
        settings.redis_url, **redis_tls_options(settings)
    )
    try:
        plan = build_plan(
            compiled, settings.namespace, vhost_of(settings), objects=mesh_objects(settings)
        )
        for note in plan.notes:
            echo(f"note: {note}")
        changes = asyncio.run(
            _provision(plan, store, settings, api, redis, dry_run=dry_run, echo=echo)
        )
    except ProvisionError as exc:
        raise click.ClickException(str(exc)) from None
    except ManagementError as exc:
        refused = exc.status in (401, 403)
        hint = (
            " (mesh provision runs as a broker administrator: the user of "
            "MESH_MANAGEMENT_URL, by default MESH_AMQP_URL's)"
        )
        raise click.ClickException(f"{exc}{hint if refused else ''}") from None
    except (RedisError, OSError) as exc:
        raise click.ClickException(
            f"Redis at {settings.redis_url.rsplit('@', 1)[-1]}: {exc} (mesh provision runs as "
            "a Redis user allowed ACL SETUSER: the user of MESH_REDIS_URL)"
        ) from None
    if not changes:
        echo("nothing to change")
    return plan


async def _provision(
    plan: Plan,
    store: CredentialStore,
    settings: Settings,
    api: ManagementAPI | None,
    redis: aioredis.Redis | None,
    *,
    dry_run: bool,
    echo: Callable[[str], None],
) -> list[Change]:
    try:
        return await provision_plan(
            plan,
            store,
            settings.amqp_url,
            api,
            redis=redis,
            redis_url=settings.redis_url,
            dry_run=dry_run,
            on_change=lambda change: echo(str(change)),
        )
    finally:
        if redis is not None:
            await redis.aclose()


def _definitions(path: Path, plan: Plan, store: CredentialStore, *, dry_run: bool) -> None:
    """Write the definitions file when it would read otherwise, and say so."""
    try:
        text = dumps(definitions(plan, store))
    except ProvisionError as exc:
        if not dry_run:
            raise click.ClickException(str(exc)) from None
        # A dry run makes no passwords for new users: the file will change.
        click.echo(f"write definitions {path}")
        return
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    if not dry_run:
        write_private(path, text)
    click.echo(f"write definitions {path}")
