"""Commands that run mesh processes: an agent, a gateway replica."""

from __future__ import annotations

import logging

import click
from mode import ServiceT, Worker

from mesh import logcontext, topology
from mesh.agent import Agent
from mesh.cli.common import example, load_agent_class, log_level_option, settings_or_exit
from mesh.config import ConfigError, Settings
from mesh.connection import BrokerUnavailable
from mesh.gateway import Gateway
from mesh.health import HealthServer
from mesh.state import StateUnavailable
from mesh.topology import TopologyError

ONE_LINE_ERRORS = (BrokerUnavailable, TopologyError, StateUnavailable, ConfigError)
"""Failures whose text says all a user needs: shown without a traceback."""


class _OneLineErrors(logging.Filter):
    """mode logs a failed start with its traceback; for these errors the text is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ONE_LINE_ERRORS):
            record.msg, record.args, record.exc_info = "%s", (str(exc),), None
        return True


def run_worker(agent: Agent, log_level: str) -> None:
    """Run ``agent`` until SIGINT/SIGTERM or a shutdown command, then drain and exit.

    With ``MESH_HEALTH_PORT`` set, the health port is up before the agent starts and
    down after it drained: mode's Worker stops its services in reverse order.
    """
    logcontext.configure(log_level.upper())
    logging.getLogger("mode.worker").addFilter(_OneLineErrors())
    services: list[ServiceT] = [agent]
    settings = agent.settings
    if settings.health_port is not None:
        services.insert(0, HealthServer(agent, settings.health_port, settings.health_host))
    worker = Worker(*services, override_logging=False, loglevel=log_level, redirect_stdouts=False)
    worker.execute_from_commandline()


def process_settings(migrate_queues: bool) -> Settings:
    settings = settings_or_exit()
    return settings.model_copy(update={"migrate_queues": True}) if migrate_queues else settings


MIGRATE_HELP = (
    "Move the messages of queues an earlier version declared with other arguments into "
    "queues declared anew (MESH_MIGRATE_QUEUES=1)."
)


@click.command(
    epilog=example(
        "mesh run examples.vehicles:Vehicle --id v7",
        "mesh run examples.vehicles:Vehicle --id v7 --instance v7-b --log-level debug",
        "mesh run examples.vehicles:Vehicle --id v7 --migrate-queues",
    )
)
@click.argument("agent_class")
@click.option("--id", "agent_id", required=True, help="The agent id (shared by replicas).")
@click.option("--instance", default=None, help="Instance id (default: random).")
@log_level_option("debug logs every message handled (behaviour, topic, id, outcome, duration).")
@click.option("--migrate-queues", is_flag=True, help=MIGRATE_HELP)
def run(
    agent_class: str, agent_id: str, instance: str | None, log_level: str, migrate_queues: bool
) -> None:
    """Run AGENT_CLASS (module:Class) as agent --id."""
    cls = load_agent_class(agent_class)
    try:
        agent = cls(agent_id, instance=instance, settings=process_settings(migrate_queues))
    except (ValueError, topology.TopicError) as exc:
        raise click.ClickException(str(exc)) from None
    run_worker(agent, log_level)


@click.command(epilog=example("mesh gateway", "mesh gateway --instance gw-2"))
@click.option(
    "--id", "agent_id", default="gateway", show_default=True, help="The gateway's agent id."
)
@click.option("--instance", default=None, help="Instance id (default: random).")
@log_level_option("info logs each decision (allowed, denied); warning only problems.")
@click.option("--migrate-queues", is_flag=True, help=MIGRATE_HELP)
def gateway(agent_id: str, instance: str | None, log_level: str, migrate_queues: bool) -> None:
    """Run a gateway replica: relay mesh.policy to mesh.topic, file dead letters."""
    settings = process_settings(migrate_queues)
    run_worker(Gateway(agent_id, instance=instance, settings=settings), log_level)
