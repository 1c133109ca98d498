"""``mesh dead``: list, show and redrive the dead letters in the ``mesh.dead`` stream."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from aiormq.exceptions import ChannelClosed

from mesh.agent import Agent
from mesh.cli.common import echo_json, echo_table, example, with_client
from mesh.deadlist import DeadLetter, DeadLetterReadError, read_dead_letters, stream_end
from mesh.membership import REDIS_DOWN
from mesh.redrive import (
    MAX_IDS,
    REDRIVE,
    RedriveMark,
    RedriveMarks,
    RedriveReport,
    RedriveRequest,
    describe_mark,
)
from mesh.topology import TopicError, check_name, check_pattern, matches
from mesh.transport import settle

T = TypeVar("T")

REASON_WIDTH = 60
"""Characters of a reason the table shows (``show`` has it whole)."""


@dataclass(frozen=True)
class Pick:
    """Which dead letters a command wants: topic pattern, queue, the newest ``limit``."""

    topic: str | None = None
    queue: str | None = None
    limit: int | None = None

    def __call__(self, dead: DeadLetter) -> bool:
        return (self.topic is None or matches(self.topic, dead.topic)) and (
            self.queue is None or dead.queue == self.queue
        )


@dataclass(frozen=True)
class Listed:
    dead: DeadLetter
    mark: RedriveMark | None


def _reading(func: Callable[[Agent], Awaitable[T]]) -> T:
    """``with_client``, saying what stopped ``mesh.dead`` from being read."""

    async def run(client: Agent) -> T:
        try:
            return await func(client)
        except ChannelClosed as exc:
            raise click.ClickException(
                f"cannot read mesh.dead (does a gateway run on this vhost?): {exc}"
            ) from None
        except DeadLetterReadError as exc:
            raise click.ClickException(str(exc)) from None
        except REDIS_DOWN as exc:
            raise click.ClickException(f"Redis unreachable at MESH_REDIS_URL: {exc}") from None

    return with_client(run)


async def _list(client: Agent, pick: Pick, start: int = 0, stop: int | None = None) -> list[Listed]:
    """The dead letters ``pick`` wants from offset ``start`` through ``stop`` (default: the
    end), oldest first, with their redrive marks."""
    channel = await client.transport.open_channel()
    try:
        end = await stream_end(channel)
        if end is None:
            return []
        if stop is not None:
            end = min(end, stop)
        if pick.limit and pick.topic is None and pick.queue is None:
            start = max(start, end - pick.limit + 1)  # offsets are consecutive
        found = [dead async for dead in read_dead_letters(channel, end, start) if pick(dead)]
    finally:
        await settle(channel.close())
    if pick.limit:
        found = found[-pick.limit :]
    marks = await RedriveMarks(client.redis, client.settings.namespace).of(
        [dead.offset for dead in found]
    )
    return [Listed(dead, marks.get(dead.offset)) for dead in found]


def _pattern(topic: str | None) -> str | None:
    if topic is None:
        return None
    try:
        return check_pattern(topic)
    except TopicError as exc:
        raise click.BadParameter(str(exc), param_hint="--topic") from None


def _when(dead: DeadLetter) -> str:
    moment = dead.filed_at or dead.sent_at
    if moment is None:
        return "?"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _sender(dead: DeadLetter) -> str:
    sender = dead.sender or "?"
    return f"{sender} ({dead.sender_user})" if dead.sender_user else sender


def _short(text: str) -> str:
    return text if len(text) <= REASON_WIDTH else text[: REASON_WIDTH - 1] + "…"


def _mark_json(mark: RedriveMark | None) -> dict[str, Any] | None:
    if mark is None:
        return None
    when = datetime.fromtimestamp(mark.time, UTC).isoformat(timespec="milliseconds")
    return mark.model_dump(mode="json") | {"time": when}


@click.group(
    epilog=example(
        "mesh dead list",
        "mesh dead show 42",
        "mesh dead redrive 42",
        "mesh dead redrive --all --topic 'orders.#' --dry-run",
    )
)
def dead() -> None:
    """The mesh's dead letters: what a receiver could not handle, kept in the mesh.dead
    stream (bounded by MESH_DEAD_LETTER_MAX_BYTES and MESH_DEAD_LETTER_MAX_AGE).

    A dead letter's ID is its offset in the stream: a number given when a gateway filed it,
    never reused or changed. Listing and showing read the stream and take nothing out of it.
    """


@dead.command("list", epilog=example(
    "mesh dead list",
    "mesh dead list --topic 'orders.#' --limit 20",
    "mesh dead list --queue mesh.q.billing.invoices --json",
))
@click.option("--topic", default=None, help="Only topics this pattern matches (orders.*.new).")
@click.option("--queue", default=None, help="Only dead letters from this queue.")
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="Show the newest N (0: all).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def list_(topic: str | None, queue: str | None, limit: int, as_json: bool) -> None:
    """List dead letters, oldest first and the newest last, as a log reads.

    WHEN is when a gateway filed it; SENDER the agent that sent the message with its
    verified broker user; DEAD-LETTERED BY the broker user that put it in mesh.dlx, as
    RabbitMQ verified it (- when nothing did: the broker's own drops and expiries);
    REDRIVEN when and by whom it was put back.
    """
    pick = Pick(_pattern(topic), queue, limit or None)
    listed = _reading(lambda client: _list(client, pick))
    if as_json:
        echo_json([item.dead.summary() | {"redriven": _mark_json(item.mark)} for item in listed])
        return
    rows = [("ID", "WHEN", "QUEUE", "TOPIC", "REASON", "SENDER", "DEAD-LETTERED BY", "REDRIVEN")]
    for item in listed:
        d = item.dead
        rows.append(
            (
                str(d.offset),
                _when(d),
                d.queue,
                d.topic,
                _short(d.reason),
                _sender(d),
                d.dead_by_user or "-",
                describe_mark(item.mark) if item.mark else "-",
            )
        )
    echo_table(rows)


@dead.command(epilog=example("mesh dead show 42", "mesh dead show 42 --json"))
@click.argument("id", type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def show(id: int, as_json: bool) -> None:
    """Show dead letter ID whole: where and why it died, its properties, headers and
    payload."""
    found = _reading(lambda client: _list(client, Pick(), start=id, stop=id))
    if not found or found[0].dead.offset != id:
        raise click.ClickException(
            f"mesh.dead holds no dead letter {id} (past its retention, or never filed)"
        )
    item = found[0]
    details = item.dead.details() | {"redriven": _mark_json(item.mark)}
    if as_json:
        echo_json(details)
        return
    d = item.dead
    click.echo(f"dead letter {id}")
    fields = [
        ("queue", d.queue),
        ("topic", d.topic),
        ("type", d.type),
        ("reason", d.reason),
        # The sender's id (x-mesh-id); properties.message_id is the relayed copy's own.
        ("sender's message id", d.message_id),
        ("sender", f"{d.sender or '?'}/{d.sender_instance or '?'}"),
        ("sender user", d.sender_user or "-"),
        ("dead-lettered by", f"{d.dead_by_user or '-'} (claims agent {d.dead_by or '-'})"),
        ("sent", _moment(d.sent_at)),
        ("filed", _moment(d.filed_at)),
        ("redriven", describe_mark(item.mark) if item.mark else "no"),
    ]
    _echo_fields(fields)
    click.echo("properties:")
    _echo_fields([(k, "-" if v is None else str(v)) for k, v in details["properties"].items()])
    click.echo("headers:")
    _echo_fields([(k, json.dumps(v, ensure_ascii=False)) for k, v in details["headers"].items()])
    click.echo(f"payload ({details['size']} bytes):")
    payload = details["payload"]
    if not isinstance(payload, str):
        payload = json.dumps(payload, indent=2, ensure_ascii=False)
    for line in payload.splitlines():
        click.echo(f"  {line}")


def _moment(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone().isoformat(timespec="milliseconds")


def _echo_fields(fields: list[tuple[str, str]]) -> None:
    width = max((len(name) for name, _ in fields), default=0)
    for name, value in fields:
        click.echo(f"  {name.ljust(width)}  {value}")


@dead.command(epilog=example(
    "mesh dead redrive 42",
    "mesh dead redrive 42 --again",
    "mesh dead redrive --all --topic 'orders.#' --dry-run",
    "mesh dead redrive --all --queue mesh.q.billing.invoices",
))
@click.argument("id", type=click.IntRange(min=0), required=False)
@click.option("--all", "all_", is_flag=True, help="Every dead letter not redriven yet.")
@click.option("--topic", default=None, help="With --all: only topics this pattern matches.")
@click.option("--queue", default=None, help="With --all: only dead letters from this queue.")
@click.option("--again", is_flag=True, help="Also dead letters redriven before.")
@click.option("--dry-run", is_flag=True, help="Say what the gateway would do; send nothing.")
@click.option("--force", is_flag=True, help="Open mode only: redrive although no policy says "
              "whose the queue is.")
@click.option("--gateway", default="gateway", show_default=True, help="The gateway's agent id.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds per request.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def redrive(  # noqa: PLR0917 -- one parameter per option, as click passes them
    ctx: click.Context,
    id: int | None,
    all_: bool,
    topic: str | None,
    queue: str | None,
    again: bool,
    dry_run: bool,
    force: bool,
    gateway: str,
    timeout: float,
    as_json: bool,
) -> None:
    """Put dead letter ID (or --all) back into the queue it died in, to be handled again.

    The gateway does it, as a request from this command's operator: the policy must allow
    the operator's principal (kind operator) to request GATEWAY's redrive operation. It
    reads each dead letter from mesh.dead itself and puts it back only if the broker user
    that dead-lettered it, as RabbitMQ verified it, owns that queue (the user of the
    principal the queue's agent belongs to): a dead letter forged in another agent's name
    goes nowhere. It is an event again as its sender sent it, its attempts counted from 1.
    Each decision is audited; a dead letter is marked redriven once the broker confirmed
    it in its queue, and a second redrive is refused without --again. Exit status 1 when
    any was refused.
    """
    if (id is None) == (not all_):
        raise click.UsageError("name a dead letter's ID, or --all")
    if not all_ and (topic or queue):
        raise click.UsageError("--topic and --queue pick dead letters for --all")
    try:
        check_name("gateway id", gateway)
    except TopicError as exc:
        raise click.BadParameter(str(exc), param_hint="--gateway") from None
    pick = Pick(_pattern(topic), queue)

    async def run(client: Agent) -> list[RedriveReport]:
        if id is not None:
            ids = [id]
        else:
            ids = [
                item.dead.offset
                for item in await _list(client, pick)
                if again or item.mark is None
            ]
        reports = []
        for first in range(0, len(ids), MAX_IDS):
            request = RedriveRequest(
                ids=ids[first : first + MAX_IDS], again=again, dry_run=dry_run, force=force
            )
            answer = await client.request(
                gateway, REDRIVE, request.model_dump(mode="json"), timeout=timeout
            )
            reports.append(RedriveReport.model_validate(answer))
        return reports

    results = [r for report in _reading(run) for r in report.results]
    if as_json:
        echo_json([r.model_dump(mode="json") for r in results])
    elif not results:
        click.echo("no dead letters to redrive")
    else:
        for r in results:
            audit = f" (audit {r.audit})" if r.audit else ""
            click.echo(f"{r.id}  {r.outcome}  {r.queue or '-'}  {r.reason}{audit}")
    ctx.exit(1 if any(r.outcome == "refused" for r in results) else 0)
