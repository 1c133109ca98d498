"""The ``mesh`` command: the group, and one module per family of subcommands.

Subcommands are imported when they run (or when help lists them): the bridge's web stack,
the policy's schema validators and the rest cost a second or more to import, and a command
such as ``mesh ping`` needs none of them.
"""

from __future__ import annotations

import importlib

import click

from mesh.cli.common import example

COMMANDS: dict[str, str] = {
    # Processes: mesh/cli/run.py
    "run": "run:run",
    "gateway": "run:gateway",
    # A whole mesh from its spec, supervised: mesh/cli/up.py
    "up": "up:up",
    "status": "up:status",
    "logs": "up:logs",
    "down": "up:down",
    "demo": "up:demo",
    # Talking to running agents: mesh/cli/control.py
    "ping": "control:ping",
    "behaviour": "control:behaviour",
    "shutdown": "control:shutdown",
    "call": "control:call",
    # Events on the mesh: mesh/cli/publish.py, mesh/cli/tail.py
    "publish": "publish:publish",
    "tail": "tail:tail",
    # The registry: mesh/cli/agents.py
    "agents": "agents:agents",
    # The mesh's queues and dead letters: mesh/cli/queues.py, mesh/cli/dead.py
    "queues": "queues:queues",
    "forget": "queues:forget",
    "dead": "dead:dead",
    # The policy file, its users' tokens and payload schemas, and broker and Redis users
    "policy": "policy:policy",
    "token": "token:token",
    "schema": "schema:schema",
    "provision": "provision:provision",
    # The gateway's audit trail: mesh/cli/audit.py
    "audit": "audit:audit",
    # REST and websocket access to the mesh: mesh/cli/bridge.py
    "bridge": "bridge:bridge",
    # Kubernetes manifests of a mesh spec: mesh/cli/k8s.py
    "k8s": "k8s:k8s",
}
"""Command name → ``module:attribute`` under ``mesh.cli``."""


class LazyGroup(click.Group):
    """A group whose subcommands (``COMMANDS``) are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(f"mesh.cli.{module}"), attribute)
        assert isinstance(command, click.Command), target
        return command


@click.group(
    cls=LazyGroup,
    epilog=example(
        "mesh gateway &",
        "mesh run examples.vehicles:Vehicle --id v7 &",
        "mesh tail --payload",
    ),
)
@click.version_option(package_name="agentmesh")
def main() -> None:
    """agentmesh: agents hosting concurrent behaviours on RabbitMQ."""
