"""Commands about the mesh's queues: list them, forget a departed agent's."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click

from mesh.cli.common import command_redis, echo_json, echo_table, example, settings_or_exit
from mesh.deadcounts import DeadLetterCounts
from mesh.inventory import Inventory, QueueReport
from mesh.management import ManagementAPI, ManagementError, vhost_of
from mesh.membership import REDIS_DOWN
from mesh.registry import Registry
from mesh.topology import TopicError, check_name

T = TypeVar("T")


def _with_inventory(func: Callable[[Inventory], Awaitable[T]]) -> T:
    async def main() -> T:
        settings = settings_or_exit()
        redis = command_redis(settings)
        inventory = Inventory(
            ManagementAPI.for_settings(settings),
            vhost_of(settings),
            Registry(redis, settings.namespace, settings.heartbeat_ttl),
            DeadLetterCounts(redis, settings.namespace),
        )
        try:
            return await func(inventory)
        except REDIS_DOWN as exc:
            raise click.ClickException(f"Redis unreachable at MESH_REDIS_URL: {exc}") from None
        except ManagementError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await redis.aclose()

    return asyncio.run(main())


@click.command(
    epilog=example("mesh queues", "mesh queues --agent tally --json", "mesh queues --gone")
)
@click.option("--agent", default=None, help="Only this agent's queues.")
@click.option("--gone", is_flag=True, help="Only queues whose agent or instance is not alive.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def queues(agent: str | None, gone: bool, as_json: bool) -> None:
    """List the mesh's queues: depth, consumers, drops and owner (live or gone).

    DROPPED counts the oldest messages a full queue dropped (a behaviour's max_queue_length);
    DEAD counts every dead letter from the queue. Dead letters themselves are kept in the
    mesh.dead stream. Depth and consumers are the broker's figures of the last few seconds.
    """
    reports = _with_inventory(lambda inventory: inventory.queues(agent))
    if gone:
        reports = [r for r in reports if not r.live]
    if as_json:
        echo_json([dataclasses.asdict(r) | {"state": r.state} for r in reports])
        return
    rows = [("QUEUE", "TYPE", "MESSAGES", "CONSUMERS", "DROPPED", "DEAD", "OWNER", "STATE")]
    for r in reports:
        owner = f"{r.owner}/{r.instance}" if r.instance else r.owner
        rows.append(
            (
                r.name,
                r.type,
                str(r.messages),
                str(r.consumers),
                str(r.dropped),
                str(r.dead),
                owner,
                r.state,
            )
        )
    echo_table(rows)


@click.command(epilog=example("mesh forget tally", "mesh forget tally --yes"))
@click.argument("agent")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def forget(agent: str, yes: bool) -> None:
    """Delete the queues of AGENT, which left for good (refused while it is alive).

    Messages still in them are lost; the command names how many and asks first. Its retry
    exchanges go too; its typed state in Redis is kept.
    """
    try:
        check_name("agent id", agent)
    except TopicError as exc:
        raise click.BadParameter(str(exc)) from None

    async def look(inventory: Inventory) -> list[QueueReport]:
        return await inventory.queues(agent)

    found = _with_inventory(look)
    alive = [r for r in found if r.live]
    if alive:
        raise click.ClickException(
            f"agent {agent!r} is alive (queues in use: {', '.join(r.name for r in alive)}); "
            "stop it first"
        )
    if not found:
        click.echo(f"agent {agent!r} has no queues")
        return
    held = sum(r.messages for r in found)
    for r in found:
        click.echo(f"  {r.name}  {r.messages} message(s)")
    question = f"delete these {len(found)} queue(s) of {agent!r}"
    question += f", losing {held} message(s)?" if held else "?"
    if not yes and not click.confirm(question, default=False):
        raise click.ClickException("nothing deleted")

    async def delete(inventory: Inventory) -> None:
        await inventory.forget(agent, found)

    _with_inventory(delete)
    click.echo(f"deleted {len(found)} queue(s) of {agent!r}")
