"""``mesh audit``: verify, read and trim the gateway's tamper-evident audit trail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import click
import redis.asyncio as aioredis

from mesh.audit import (
    DECISIONS,
    AuditEntry,
    AuditFilter,
    AuditKeys,
    AuditReader,
    AuditTampered,
    VerifyReport,
    trim,
    verify_audit,
)
from mesh.cli.common import command_redis, echo_json, echo_table, example, settings_or_exit
from mesh.config import ConfigError, Settings
from mesh.membership import REDIS_DOWN
from mesh.topology import TopicError, check_pattern

T = TypeVar("T")

_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def duration(value: str) -> float:
    """Seconds in ``90s``, ``30m``, ``12h``, ``7d`` or ``2w``."""
    found = _DURATION.match(value.strip())
    if not found:
        raise click.BadParameter(f"{value!r} is not a duration such as 90s, 30m, 12h, 7d or 2w")
    return float(found[1]) * _UNITS[found[2]]


def moment_ms(value: str) -> int:
    """A time as Unix ms: a duration ago (``1h``) or a date and time (``2024-06-01T12:00``,
    local time unless it names a zone)."""
    if _DURATION.match(value.strip()):
        return round((time.time() - duration(value)) * 1000)
    try:
        return round(datetime.fromisoformat(value).timestamp() * 1000)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither a duration ago (1h, 7d) nor a time (2024-06-01T12:00)"
        ) from None


def _run(func: Callable[[aioredis.Redis, Settings], Awaitable[T]]) -> T:
    async def main() -> T:
        settings = settings_or_exit()
        redis = command_redis(settings)
        try:
            return await func(redis, settings)
        except REDIS_DOWN as exc:
            raise click.ClickException(f"Redis unreachable at MESH_REDIS_URL: {exc}") from None
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await redis.aclose()

    return asyncio.run(main())


def _filters(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that pick records: principal, agent, topic, decision."""
    options = [
        click.option(
            "--principal", default=None, help="Only this principal's (or its delegate's) records."
        ),
        click.option("--agent", default=None, help="Only records of this agent id."),
        click.option(
            "--topic", default=None, help="Only topics this pattern matches (vehicle.*.speed)."
        ),
        click.option(
            "--decision", type=click.Choice(DECISIONS), default=None, help="Only this decision."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _where(
    principal: str | None, agent: str | None, topic: str | None, decision: Any
) -> AuditFilter:
    if topic is not None:
        try:
            check_pattern(topic)
        except TopicError as exc:
            raise click.BadParameter(str(exc), param_hint="--topic") from None
    return AuditFilter(principal=principal, agent=agent, topic=topic, decision=decision)


def line(entry: AuditEntry) -> str:
    """What ``tail`` and ``query`` print for one record without ``--json``."""
    record = entry.record
    when = datetime.fromtimestamp(record.time).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    who = f"{record.agent or '?'}/{record.instance or '?'}"
    if record.principal:
        via = f" via {record.delegated_by}" if record.delegated_by else ""
        who += f" ({record.principal}{via})"
    parts = [when, record.decision, who, record.type or "?", record.topic]
    if record.stage or record.reason:
        parts.append(f"{record.stage or '?'}: {record.reason or ''}".rstrip(": "))
    if record.findings:
        parts.append("found " + ", ".join(f"{f.kind} at {f.path}" for f in record.findings))
    return "  ".join(parts)


def _compact(entry: AuditEntry) -> str:
    return json.dumps(entry.as_dict(), ensure_ascii=False, separators=(",", ":"))


@click.group(
    epilog=example(
        "mesh audit verify",
        "mesh audit tail --follow",
        "mesh audit query --principal vehicles --decision denied --since 1h",
        "mesh audit export --since 2024-06-01 > audit.jsonl",
        "mesh audit trim --keep 7d",
    )
)
def audit() -> None:
    """The gateway's tamper-evident audit trail: one record per decision, in Redis.

    Every record is sealed with an HMAC-SHA256 over it and the record before, keyed with the
    gateway's secret (MESH_AUDIT_KEY or MESH_AUDIT_KEY_FILE, with MESH_AUDIT_KEY_ID; older keys
    in MESH_AUDIT_KEYS_FILE). Reading needs no key; verify and trim do.
    """


@audit.command(epilog=example("mesh audit verify", "mesh audit verify --json"))
@click.option("--chain", "chains", multiple=True, help="Only this chain (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def verify(ctx: click.Context, chains: tuple[str, ...], as_json: bool) -> None:
    """Verify every record and checkpoint; name the first record that does not verify.

    Exit status 0 when everything verifies, 1 when not. A problem is named as edited,
    deleted, inserted, reordered, or unverifiable (a key id none of the keys has).
    """

    async def run(redis: aioredis.Redis, settings: Settings) -> VerifyReport:
        keys = AuditKeys.from_settings(settings)
        return await verify_audit(redis, settings.namespace, keys, chains=chains or None)

    report = _run(run)
    if as_json:
        echo_json(report.as_dict())
    else:
        speed = report.records / report.seconds if report.seconds else 0.0
        click.echo(
            f"verified {report.records} record(s) in {len(report.chains)} chain(s) and "
            f"{report.checkpoints.records} checkpoint(s) in {report.seconds:.2f} s "
            f"({speed:,.0f} records/s)"
        )
        for problem in report.problems:
            click.echo(f"NOT VERIFIED  {problem}")
        if report.ok:
            click.echo("OK")
    ctx.exit(0 if report.ok else 1)


@audit.command(epilog=example("mesh audit chains", "mesh audit chains --json"))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def chains(as_json: bool) -> None:
    """List the audit chains (one per gateway replica run) with their records."""

    async def run(redis: aioredis.Redis, settings: Settings) -> list[Any]:
        return await AuditReader(redis, settings.namespace).chains()

    found = _run(run)
    if as_json:
        echo_json([info.__dict__ for info in found])
        return
    rows = [("CHAIN", "RECORDS", "LAST SEQ", "FIRST", "LAST")]
    for info in found:
        rows.append(
            (
                info.chain,
                str(info.records),
                str(info.last_seq or "-"),
                _entry_time(info.first),
                _entry_time(info.last),
            )
        )
    echo_table(rows)


def _entry_time(entry_id: str | None) -> str:
    if entry_id is None:
        return "-"
    return datetime.fromtimestamp(int(entry_id.partition("-")[0]) / 1000).strftime(
        "%Y-%m-%d %H:%M:%S"
    )


@audit.command(
    epilog=example(
        "mesh audit tail",
        "mesh audit tail -n 100 --decision denied",
        "mesh audit tail --follow --json",
    )
)
@click.option("-n", "--lines", "count", default=20, show_default=True, help="Newest records shown.")
@click.option("-f", "--follow", is_flag=True, help="Then show records as they come.")
@_filters
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tail(
    *,
    count: int,
    follow: bool,
    principal: str | None,
    agent: str | None,
    topic: str | None,
    decision: Any,
    as_json: bool,
) -> None:
    """Show the newest audit records (of every chain, in time order); --follow for more."""
    where = _where(principal, agent, topic, decision)
    show = _compact if as_json else line

    async def run(redis: aioredis.Redis, settings: Settings) -> None:
        reader = AuditReader(redis, settings.namespace)
        now = await reader.now_ms()  # what came before is shown now, what comes after next
        for entry in await reader.last(count, where, until_ms=now):
            click.echo(show(entry))
        if follow:
            async for entry in reader.follow(where, since_ms=now):
                click.echo(show(entry))

    with contextlib.suppress(KeyboardInterrupt):
        _run(run)


@audit.command(
    epilog=example(
        "mesh audit query --principal vehicles --since 1h",
        "mesh audit query --topic 'vehicle.#' --decision denied --json",
        "mesh audit query --since 2024-06-01T00:00 --until 2024-06-02T00:00 --limit 0",
    )
)
@_filters
@click.option("--since", default=None, help="From this time: 1h (ago) or 2024-06-01T12:00.")
@click.option("--until", default=None, help="Before this time: 10m (ago) or 2024-06-01T13:00.")
@click.option("--limit", default=100, show_default=True, help="Records shown at most (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def query(
    *,
    principal: str | None,
    agent: str | None,
    topic: str | None,
    decision: Any,
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Find audit records by principal, agent, topic, decision and time, oldest first."""
    where = _where(principal, agent, topic, decision)
    since_ms = None if since is None else moment_ms(since)
    until_ms = None if until is None else moment_ms(until)

    async def run(redis: aioredis.Redis, settings: Settings) -> list[AuditEntry]:
        reader = AuditReader(redis, settings.namespace)
        found = reader.entries(where, since_ms=since_ms, until_ms=until_ms, limit=limit or None)
        return [entry async for entry in found]

    found = _run(run)
    if as_json:
        echo_json([entry.as_dict() for entry in found])
        return
    for entry in found:
        click.echo(line(entry))
    if limit and len(found) == limit:
        click.echo(f"(the first {limit}; --limit 0 shows all)", err=True)


@audit.command(
    epilog=example(
        "mesh audit export > audit.jsonl",
        "mesh audit export --since 7d --output last-week.jsonl",
        "mesh audit export --agent v7 --decision denied",
    )
)
@_filters
@click.option("--since", default=None, help="From this time: 7d (ago) or 2024-06-01.")
@click.option("--until", default=None, help="Before this time: 1d (ago) or 2024-06-08.")
@click.option(
    "-o", "--output", type=click.File("w"), default="-", help="File to write (default stdout)."
)
def export(
    *,
    principal: str | None,
    agent: str | None,
    topic: str | None,
    decision: Any,
    since: str | None,
    until: str | None,
    output: Any,
) -> None:
    """Write audit records as JSON Lines, oldest first: each with its chain, entry id, seq,
    key id, prev and mac, so what was exported can be matched against the trail."""
    where = _where(principal, agent, topic, decision)
    since_ms = None if since is None else moment_ms(since)
    until_ms = None if until is None else moment_ms(until)

    async def run(redis: aioredis.Redis, settings: Settings) -> int:
        written = 0
        reader = AuditReader(redis, settings.namespace)
        async for entry in reader.entries(where, since_ms=since_ms, until_ms=until_ms):
            output.write(_compact(entry) + "\n")
            written += 1
        return written

    written = _run(run)
    output.flush()
    if output is not sys.stdout:
        click.echo(f"exported {written} record(s)", err=True)


@audit.command("trim", epilog=example("mesh audit trim --keep 7d", "mesh audit trim --keep 12h"))
@click.option("--keep", required=True, help="Keep records younger than this: 7d, 12h, 2w …")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def trim_command(keep: str, as_json: bool) -> None:
    """Remove audit records older than --keep, after verifying the whole trail.

    A trail that does not verify is not trimmed (that would destroy the evidence). A signed
    trim checkpoint records where each chain now begins, so verify keeps working; chains of
    replicas gone for longer than --keep are removed whole.
    """
    seconds = duration(keep)

    async def run(redis: aioredis.Redis, settings: Settings) -> Any:
        keys = AuditKeys.from_settings(settings)
        try:
            return await trim(redis, settings.namespace, keys, keep=seconds)
        except AuditTampered as exc:
            raise click.ClickException(str(exc)) from None

    report = _run(run)
    if as_json:
        echo_json(report.__dict__)
        return
    cutoff = _entry_time(f"{report.before_ms}-0")
    click.echo(
        f"verified {report.verified} record(s); removed {report.removed} record(s) and "
        f"{report.removed_checkpoints} checkpoint(s) older than {cutoff}"
    )
    if report.retired:
        click.echo(f"removed whole: {', '.join(report.retired)}")
    click.echo(f"trim checkpoint {report.checkpoint}")

