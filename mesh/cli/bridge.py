"""``mesh bridge``: serve REST and websocket access to the mesh (``mesh.bridge``)."""

from __future__ import annotations

import click

from mesh import logcontext
from mesh.bridge import Bridge, BridgeConfig, BridgeError
from mesh.bridge.server import server
from mesh.cli.common import example, log_level_option, settings_or_exit
from mesh.policy import PolicyError, TokenError, load_policy
from mesh.topology import TopicError


@click.command(
    epilog=example(
        "MESH_POLICY=policy.yaml mesh bridge --port 8080",
        "mesh bridge --host 0.0.0.0 --id bridge-eu",
        "mesh bridge --insecure-open   # no policy: anyone may do anything",
    )
)
@click.option(
    "--host",
    envvar="MESH_BRIDGE_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (MESH_BRIDGE_HOST).",
)
@click.option(
    "--port",
    envvar="MESH_BRIDGE_PORT",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to listen on (MESH_BRIDGE_PORT).",
)
@click.option(
    "--id",
    "agent_id",
    envvar="MESH_BRIDGE_ID",
    default="bridge",
    show_default=True,
    help="The bridge's agent id; its principal must be kind: bridge (MESH_BRIDGE_ID).",
)
@click.option(
    "--gateway",
    "gateway_id",
    envvar="MESH_BRIDGE_GATEWAY",
    default="gateway",
    show_default=True,
    help="The gateway's agent id, which redrives dead letters (MESH_BRIDGE_GATEWAY).",
)
@click.option(
    "--insecure-open",
    is_flag=True,
    envvar="MESH_BRIDGE_INSECURE_OPEN",
    help="Serve without a policy: no tokens, every caller may do anything.",
)
@log_level_option("How much the bridge logs (its HTTP access log at info).")
def bridge(  # noqa: PLR0917 -- one parameter per option, as click passes them
    host: str, port: int, agent_id: str, gateway_id: str, insecure_open: bool, log_level: str
) -> None:
    """Serve the mesh over HTTP: REST (/docs, /openapi.json), a websocket (/ws) and
    Server-Sent Events (/stream), and the dashboard at /.

    Callers send a bearer token of a policy user (mesh token issue NAME --policy
    policy.yaml); the bridge sends on their behalf, as its own broker user, and the
    gateway authorizes each caller by the policy (MESH_POLICY). Without a policy it
    refuses to start, unless --insecure-open.
    """
    logcontext.configure(log_level.upper())
    settings = settings_or_exit()
    config = BridgeConfig(
        host=host,
        port=port,
        agent_id=agent_id,
        gateway_id=gateway_id,
        insecure_open=insecure_open,
    )
    try:
        policy = load_policy(settings.policy) if settings.policy else None
        service = Bridge(settings, config, policy)
    except (PolicyError, TokenError, BridgeError, TopicError) as exc:
        raise click.ClickException(str(exc)) from None
    if policy is None:
        click.echo(
            "WARNING: no policy (MESH_POLICY): OPEN MODE, no tokens are checked and anyone "
            f"who reaches {host}:{port} may publish, call and control anything.",
            err=True,
        )
    server(service).run()
