"""Commands that read the registry: who is alive, with which behaviours."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import click

from mesh.cli.common import command_redis, echo_json, echo_table, example, settings_or_exit
from mesh.membership import REDIS_DOWN
from mesh.registry import Registry

T = TypeVar("T")


def _registry_query(func: Callable[[Registry], Awaitable[T]]) -> T:
    """Run ``func`` against the registry; only Redis is needed."""

    async def main() -> T:
        settings = settings_or_exit()
        redis = command_redis(settings)
        try:
            return await func(Registry(redis, settings.namespace, settings.heartbeat_ttl))
        except REDIS_DOWN as exc:
            raise click.ClickException(f"Redis unreachable at MESH_REDIS_URL: {exc}") from None
        finally:
            await redis.aclose()

    return asyncio.run(main())


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    return f"{max(seconds, 0):.1f}s ago"


@click.group(
    invoke_without_command=True,
    epilog=example(
        "mesh agents", "mesh agents --capability telemetry --json", "mesh agents show v7"
    ),
)
@click.option("--json", "as_json", is_flag=True, help="One JSON array of the agents.")
@click.option("--capability", default=None, help="Only agents with this capability.")
@click.option("--topic", default=None, help="Only agents with a behaviour receiving this topic.")
@click.option("--all", "show_all", is_flag=True, help="Include lapsed instances not yet pruned.")
@click.pass_context
def agents(
    ctx: click.Context, as_json: bool, capability: str | None, topic: str | None, show_all: bool
) -> None:
    """List the live agents from the registry."""
    if ctx.invoked_subcommand is not None:
        return
    records = _registry_query(
        lambda r: r.agents(capability=capability, topic=topic, alive=not show_all)
    )
    if as_json:
        echo_json([r.model_dump(mode="json") for r in records])
        return
    rows = [("AGENT", "INSTANCES", "BEHAVIOURS", "CAPABILITIES", "LAST HEARTBEAT")]
    for record in records:
        names = sorted({b.name for i in record.instances for b in i.behaviours})
        rows.append(
            (
                record.agent,
                str(len([i for i in record.instances if i.alive])),
                ",".join(names) or "-",
                ",".join(record.capabilities) or "-",
                _ago(record.last_heartbeat),
            )
        )
    echo_table(rows)


@agents.command("show", epilog=example("mesh agents show v7", "mesh agents show v7 --json"))
@click.argument("agent_id")
@click.option("--json", "as_json", is_flag=True, help="The agent's record as JSON.")
def agents_show(agent_id: str, as_json: bool) -> None:
    """Show one agent: every instance with its behaviours."""
    record = _registry_query(lambda r: r.agent(agent_id))
    if record is None:
        raise click.ClickException(f"no live agent {agent_id!r} in the registry")
    if as_json:
        echo_json(record.model_dump(mode="json"))
        return
    click.echo(f"agent {record.agent}  capabilities: {', '.join(record.capabilities) or '-'}")
    for inst in record.instances:
        click.echo(
            f"  instance {inst.instance}  host {inst.host} pid {inst.pid}  "
            f"version {inst.version}  started {inst.started_at:%Y-%m-%d %H:%M:%S}  "
            f"heartbeat {_ago(inst.heartbeat_at)}"
        )
        if inst.metadata:
            click.echo(f"    metadata: {json.dumps(inst.metadata)}")
        for b in inst.behaviours:
            exit_code = "" if b.exit_code is None else f" exit {b.exit_code}"
            click.echo(
                f"    {b.name:<16} {b.kind:<10} {b.state}{exit_code}  "
                f"{' '.join(b.binding_keys) or '-'}"
            )
