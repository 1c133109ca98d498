"""``mesh k8s``: a mesh spec as Kubernetes objects (a kustomize overlay on deploy/k8s/base)."""

from __future__ import annotations

from pathlib import Path

import click

from mesh.cli.common import example, settings_or_exit
from mesh.cli.policy import load_policy_or_exit
from mesh.deploy.errors import SpecError
from mesh.provision import CredentialStore, ProvisionError, credentials_dir


@click.group(
    epilog=example(
        "mesh provision examples/policy.yaml --no-broker",
        "mesh k8s render examples/demo/mesh.yaml -o deploy/k8s/demo",
        "kubectl apply -k deploy/k8s/demo",
    )
)
def k8s() -> None:
    """Kubernetes manifests of a mesh spec."""


@k8s.command(
    epilog=example(
        "mesh k8s render examples/demo/mesh.yaml -o deploy/k8s/demo",
        "mesh k8s render mesh.yaml -o out --base deploy/k8s/overlays/prod --tls",
        "mesh k8s render mesh.yaml -o out --image registry.example/agentmesh:1.4",
    )
)
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False),
    default="deploy/k8s/mesh",
    show_default=True,
    help="The overlay's directory (it holds secrets: keep it out of git).",
)
@click.option(
    "--base",
    type=click.Path(exists=True, file_okay=False),
    default="deploy/k8s/base",
    show_default=True,
    help="The kustomization the overlay builds on (the base, overlays/dev or overlays/prod).",
)
@click.option(
    "--credentials",
    type=click.Path(file_okay=False),
    default=None,
    help="The credentials directory mesh provision wrote (default: as mesh provision's).",
)
@click.option("--tls", is_flag=True, help="amqps:// and rediss:// URLs (the prod overlay).")
@click.option("--image", default=None, help="The image of the mesh's pods (default agentmesh).")
def render(  # noqa: PLR0917 (click passes each option)
    spec_file: str,
    output: str,
    base: str,
    credentials: str | None,
    tls: bool,
    image: str | None,
) -> None:
    """Write the overlay of SPEC_FILE: a Deployment per agent, the gateway's replicas, the
    bridge on or off, Secrets of each principal's credentials (from mesh provision's
    credentials directory, their hosts the cluster's rabbitmq and redis Services), the
    RabbitMQ definitions and Redis ACL file of the policy, and a Job (mesh-provision) that
    provisions a running cluster: RabbitMQ imports definitions only at its first boot.

    Apply with kubectl apply -k OUTPUT.
    """
    from mesh.deploy.k8s import Services
    from mesh.deploy.k8s import render as render_overlay
    from mesh.deploy.spec import load_spec

    settings = settings_or_exit()
    try:
        spec = load_spec(spec_file)
    except SpecError as exc:
        raise click.ClickException(str(exc)) from None
    policy = load_policy_or_exit(str(spec.policy), 1)
    store = CredentialStore(credentials_dir(spec.policy, credentials))
    try:
        written = render_overlay(
            spec,
            policy,
            store,
            settings,
            Path(output),
            base=Path(base),
            services=Services(tls=tls),
            image=image,
        )
    except (SpecError, ProvisionError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {len(written)} files to {output}: kubectl apply -k {output}")
