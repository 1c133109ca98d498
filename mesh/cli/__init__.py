"""The ``mesh`` command: the group, and one module per family of subcommands."""

from __future__ import annotations

import click

from mesh.cli import (
    agents,
    audit,
    bridge,
    control,
    dead,
    policy,
    provision,
    publish,
    queues,
    run,
    schema,
    tail,
    token,
    up,
)
from mesh.cli.common import example


@click.group(
    epilog=example(
        "mesh gateway &",
        "mesh run examples.vehicles:Vehicle --id v7 &",
        "mesh tail --payload",
    )
)
@click.version_option(package_name="agentmesh")
def main() -> None:
    """agentmesh: agents hosting concurrent behaviours on RabbitMQ."""


# Processes: mesh/cli/run.py
main.add_command(run.run)
main.add_command(run.gateway)

# A whole mesh from its spec, supervised: mesh/cli/up.py
main.add_command(up.up)
main.add_command(up.status)
main.add_command(up.logs)
main.add_command(up.down)
main.add_command(up.demo)

# Talking to running agents: mesh/cli/control.py
main.add_command(control.ping)
main.add_command(control.behaviour)
main.add_command(control.shutdown)
main.add_command(control.call)

# Events on the mesh: mesh/cli/publish.py, mesh/cli/tail.py
main.add_command(publish.publish)
main.add_command(tail.tail)

# The registry: mesh/cli/agents.py
main.add_command(agents.agents)

# The mesh's queues: mesh/cli/queues.py
main.add_command(queues.queues)
main.add_command(queues.forget)

# The dead letters: mesh/cli/dead.py
main.add_command(dead.dead)

# The policy file, its users' tokens and its payload schemas: mesh/cli/policy.py,
# mesh/cli/token.py, mesh/cli/schema.py
main.add_command(policy.policy)
main.add_command(token.token)
main.add_command(schema.schema)

# Broker users from the policy: mesh/cli/provision.py
main.add_command(provision.provision)

# The gateway's audit trail: mesh/cli/audit.py
main.add_command(audit.audit)

# REST and websocket access to the mesh: mesh/cli/bridge.py
main.add_command(bridge.bridge)
