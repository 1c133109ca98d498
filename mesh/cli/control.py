"""Commands that talk to running agents over the mesh: ping, control commands, requests."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from mesh import topology
from mesh.cli.common import echo_json, example, with_client
from mesh.envelope import error_of
from mesh.topology import TopicError


@click.command(epilog=example("mesh ping", "mesh ping --agent v7 --timeout 3 --json"))
@click.option("--agent", default=topology.ALL_AGENTS, help="Only this agent's instances.")
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to collect answers.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of the answers.")
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


ANSWER_TIMEOUT = "Seconds to collect the instances' answers."


def _control(agent: str, command: str, payload: dict[str, Any], timeout: float) -> None:
    answers = with_client(lambda client: client.control(agent, command, payload, timeout=timeout))
    if not answers:
        raise click.ClickException(f"no instance of {agent!r} answered within {timeout:g}s")
    failed = False
    for answer in answers:
        instance = answer.instance or "?"
        if answer.type == "error":
            failed = True
            error_type, detail = error_of(answer.payload)
            click.echo(f"{answer.app_id}/{instance}: {error_type}: {detail}", err=True)
        else:
            click.echo(f"{answer.app_id}/{instance}: {json.dumps(answer.payload)}")
    if failed:
        sys.exit(1)


@click.group(epilog=example("mesh behaviour stop v7 report", "mesh behaviour start v7 report"))
def behaviour() -> None:
    """Start or stop a behaviour of a running agent (every instance)."""


@behaviour.command("start", epilog=example("mesh behaviour start v7 report"))
@click.argument("agent")
@click.argument("name")
@click.option("--timeout", default=2.0, show_default=True, help=ANSWER_TIMEOUT)
def behaviour_start(agent: str, name: str, timeout: float) -> None:
    """Start behaviour NAME of AGENT."""
    _control(agent, "start_behaviour", {"behaviour": name}, timeout)


@behaviour.command("stop", epilog=example("mesh behaviour stop v7 report --timeout 10"))
@click.argument("agent")
@click.argument("name")
@click.option("--timeout", default=5.0, show_default=True, help=ANSWER_TIMEOUT)
def behaviour_stop(agent: str, name: str, timeout: float) -> None:
    """Stop behaviour NAME of AGENT (in-flight messages finish first)."""
    _control(agent, "stop_behaviour", {"behaviour": name}, timeout)


@click.command(epilog=example("mesh shutdown v7"))
@click.argument("agent")
@click.option("--timeout", default=2.0, show_default=True, help=ANSWER_TIMEOUT)
def shutdown(agent: str, timeout: float) -> None:
    """Ask every instance of AGENT to drain and exit."""
    _control(agent, "shutdown", {}, timeout)


@click.command(
    epilog=example(
        "mesh call v7 status",
        "mesh call billing invoice '{\"order\": 42}' --timeout 10",
        "mesh call v7 status '{\"verbose\": true}' --schema status@1",
    )
)
@click.argument("agent")
@click.argument("operation")
@click.argument("payload", default="{}")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the reply.")
@click.option(
    "--schema",
    default=None,
    metavar="NAME@VERSION",
    help="The schema version the payload follows (x-mesh-schema), where the policy asks.",
)
def call(agent: str, operation: str, payload: str, timeout: float, schema: str | None) -> None:
    """Call OPERATION on AGENT with a JSON PAYLOAD and print the reply."""
    try:
        topology.check_name("agent id", agent)
        topology.check_name("operation", operation)
        body = json.loads(payload)
    except TopicError as exc:
        raise click.BadParameter(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"payload is not JSON: {exc}") from None
    echo_json(
        with_client(
            lambda client: client.request(agent, operation, body, timeout=timeout, schema=schema)
        )
    )
