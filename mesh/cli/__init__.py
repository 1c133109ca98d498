"""The ``mesh`` command."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import redis.asyncio as aioredis
from mode import Worker
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from mesh import logcontext, topology
from mesh.agent import Agent, RemoteError, RequestTimeout
from mesh.client import Client
from mesh.config import ConfigError, Settings
from mesh.gateway import Gateway
from mesh.membership import REDIS_DOWN
from mesh.registry import Registry
from mesh.topology import TopicError
from mesh.transport import BrokerUnavailable, PublishError

T = TypeVar("T")


def load_agent_class(spec: str) -> type[Agent]:
    """Import ``module:Class`` (relative to the current directory too)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"{spec!r} is not of the form module:Class")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if isinstance(cls, type) and issubclass(cls, Agent):
        return cls
    found = sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, Agent) and value.__module__ == module_name
    )
    problem = (
        f"module {module_name!r} has no {attr!r}"
        if cls is None
        else f"{spec!r} is not an Agent subclass"
    )
    raise click.BadParameter(f"{problem} (Agent classes in it: {', '.join(found) or 'none'})")


def settings_or_exit() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def run_worker(agent: Agent, log_level: str) -> None:
    """Run ``agent`` until SIGINT/SIGTERM or a shutdown command, then drain and exit."""
    logcontext.configure(log_level.upper())
    worker = Worker(agent, override_logging=False, loglevel=log_level, redirect_stdouts=False)
    worker.execute_from_commandline()


def with_client(func: Callable[[Agent], Awaitable[T]]) -> T:
    """Run ``func`` with a short-lived agent that has no behaviours (for commands)."""

    async def main() -> T:
        client = Client(settings=settings_or_exit())
        async with client:
            return await func(client)

    logcontext.configure("WARNING")
    try:
        return asyncio.run(main())
    except (BrokerUnavailable, PublishError, RequestTimeout, RemoteError, TopicError) as exc:
        raise click.ClickException(str(exc)) from None


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group()
@click.version_option(package_name="agentmesh")
def main() -> None:
    """agentmesh: agents hosting concurrent behaviours on RabbitMQ."""


@main.command()
@click.argument("agent_class")
@click.option("--id", "agent_id", required=True, help="The agent id (shared by replicas).")
@click.option("--instance", default=None, help="Instance id (default: random).")
@click.option("--log-level", default="info", show_default=True)
def run(agent_class: str, agent_id: str, instance: str | None, log_level: str) -> None:
    """Run AGENT_CLASS (module:Class) as agent --id."""
    cls = load_agent_class(agent_class)
    try:
        agent = cls(agent_id, instance=instance, settings=settings_or_exit())
    except (ValueError, topology.TopicError) as exc:
        raise click.ClickException(str(exc)) from None
    run_worker(agent, log_level)


@main.command()
@click.option("--id", "agent_id", default="gateway", show_default=True)
@click.option("--instance", default=None)
@click.option("--log-level", default="info", show_default=True)
def gateway(agent_id: str, instance: str | None, log_level: str) -> None:
    """Run a gateway replica: relay mesh.policy to mesh.topic."""
    run_worker(Gateway(agent_id, instance=instance, settings=settings_or_exit()), log_level)


@main.command()
@click.option("--agent", default=topology.ALL_AGENTS, help="Only this agent's instances.")
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to collect answers.")
@click.option("--json", "as_json", is_flag=True)
def ping(agent: str, timeout: float, as_json: bool) -> None:
    """Ping agents; list the instances that answered, with their behaviours."""
    replies = with_client(lambda client: client.ping(agent, timeout=timeout))
    if as_json:
        echo_json([r.model_dump(mode="json") for r in replies])
        return
    if not replies:
        raise click.ClickException(f"no agent answered within {timeout:g}s")
    for reply in replies:
        behaviours = ", ".join(f"{b.name}({b.kind}:{b.state})" for b in reply.behaviours)
        click.echo(f"{reply.agent}/{reply.instance}  pid {reply.pid}  {behaviours or '-'}")


def _control(agent: str, command: str, payload: dict[str, Any], timeout: float) -> None:
    answers = with_client(lambda client: client.control(agent, command, payload, timeout=timeout))
    if not answers:
        raise click.ClickException(f"no instance of {agent!r} answered within {timeout:g}s")
    failed = False
    for answer in answers:
        instance = answer.instance or "?"
        if answer.type == "error":
            failed = True
            click.echo(f"{answer.app_id}/{instance}: error: {answer.payload}", err=True)
        else:
            click.echo(f"{answer.app_id}/{instance}: {json.dumps(answer.payload)}")
    if failed:
        sys.exit(1)


@main.group()
def behaviour() -> None:
    """Start or stop a behaviour of a running agent (every instance)."""


@behaviour.command("start")
@click.argument("agent")
@click.argument("name")
@click.option("--timeout", default=2.0, show_default=True)
def behaviour_start(agent: str, name: str, timeout: float) -> None:
    """Start behaviour NAME of AGENT."""
    _control(agent, "start_behaviour", {"behaviour": name}, timeout)


@behaviour.command("stop")
@click.argument("agent")
@click.argument("name")
@click.option("--timeout", default=5.0, show_default=True)
def behaviour_stop(agent: str, name: str, timeout: float) -> None:
    """Stop behaviour NAME of AGENT (in-flight messages finish first)."""
    _control(agent, "stop_behaviour", {"behaviour": name}, timeout)


@main.command()
@click.argument("agent")
@click.option("--timeout", default=2.0, show_default=True)
def shutdown(agent: str, timeout: float) -> None:
    """Ask every instance of AGENT to drain and exit."""
    _control(agent, "shutdown", {}, timeout)


@main.command()
@click.argument("agent")
@click.argument("operation")
@click.argument("payload", default="{}")
@click.option("--timeout", default=5.0, show_default=True)
def call(agent: str, operation: str, payload: str, timeout: float) -> None:
    """Call OPERATION on AGENT with a JSON PAYLOAD and print the reply."""
    try:
        topology.check_name("agent id", agent)
        topology.check_name("operation", operation)
        body = json.loads(payload)
    except TopicError as exc:
        raise click.BadParameter(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"payload is not JSON: {exc}") from None
    echo_json(with_client(lambda client: client.request(agent, operation, body, timeout=timeout)))


def _registry_query(func: Callable[[Registry], Awaitable[T]]) -> T:
    """Run ``func`` against the registry; only Redis is needed."""

    async def main() -> T:
        settings = settings_or_exit()
        # One attempt, whatever the URL asks: each redis-py retry would wait a timeout more.
        redis = aioredis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, retry=RedisRetry(NoBackoff(), 0)
        )
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


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@agents.command("show")
@click.argument("agent_id")
@click.option("--json", "as_json", is_flag=True)
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


@main.command()
@click.option("--seconds", default=0.0, help="Stop after this long (default: until Ctrl+C).")
def demo(seconds: float) -> None:
    """Run the demo mesh: a gateway, two vehicles and a monitor, as separate processes."""
    from mesh.demo import run_demo

    try:
        code = asyncio.run(run_demo(seconds))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
