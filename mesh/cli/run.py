"""Commands that run mesh processes: an agent, a gateway replica, the demo."""

from __future__ import annotations

import asyncio
import sys

import click
from mode import Worker

from mesh import logcontext, topology
from mesh.agent import Agent
from mesh.cli.common import example, load_agent_class, settings_or_exit
from mesh.gateway import Gateway


def run_worker(agent: Agent, log_level: str) -> None:
    """Run ``agent`` until SIGINT/SIGTERM or a shutdown command, then drain and exit."""
    logcontext.configure(log_level.upper())
    worker = Worker(agent, override_logging=False, loglevel=log_level, redirect_stdouts=False)
    worker.execute_from_commandline()


@click.command(
    epilog=example(
        "mesh run examples.vehicles:Vehicle --id v7",
        "mesh run examples.vehicles:Vehicle --id v7 --instance v7-b --log-level debug",
    )
)
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


@click.command(epilog=example("mesh gateway", "mesh gateway --instance gw-2"))
@click.option("--id", "agent_id", default="gateway", show_default=True)
@click.option("--instance", default=None)
@click.option("--log-level", default="info", show_default=True)
def gateway(agent_id: str, instance: str | None, log_level: str) -> None:
    """Run a gateway replica: relay mesh.policy to mesh.topic."""
    run_worker(Gateway(agent_id, instance=instance, settings=settings_or_exit()), log_level)


@click.command(epilog=example("mesh demo", "mesh demo --seconds 30"))
@click.option("--seconds", default=0.0, help="Stop after this long (default: until Ctrl+C).")
def demo(seconds: float) -> None:
    """Run the demo mesh: a gateway, two vehicles and a monitor, as separate processes."""
    from mesh.demo import run_demo

    try:
        code = asyncio.run(run_demo(seconds))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)
