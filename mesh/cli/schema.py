"""``mesh schema``: the policy's payload schemas, exported as an AsyncAPI 3.0 document."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from mesh.cli.common import example
from mesh.cli.policy import load_policy_or_exit
from mesh.policy.asyncapi import asyncapi_document


@click.group(epilog=example("mesh schema export examples/policy.yaml -o asyncapi.yaml"))
def schema() -> None:
    """The payload schemas a policy declares for topics and request operations."""


@schema.command(
    epilog=example(
        "mesh schema export examples/policy.yaml",
        "mesh schema export examples/policy.yaml -o asyncapi.json",
        "mesh schema export policy.yaml --title 'Fleet telemetry' --api-version 2.1.0",
    )
)
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write here: JSON if it ends in .json, else YAML (default: YAML on stdout).",
)
@click.option("--title", default=None, help="The document's title (default: from the file).")
@click.option("--api-version", default="1.0.0", show_default=True, help="info.version.")
def export(policy_file: str, output: str | None, title: str | None, api_version: str) -> None:
    """Write POLICY_FILE's topics and request operations, with the schema versions they
    accept, as an AsyncAPI 3.0 document.

    A channel per topic pattern (send and receive operations) and per request operation
    (send, with its reply); a message per schema version, told apart by the x-mesh-schema
    header.  Exit status: 0 written, 1 the policy is invalid.
    """
    compiled = load_policy_or_exit(policy_file, 1)
    if not compiled.schemas.declared:
        click.echo(f"{policy_file}: declares no schemas: the document lists no channels", err=True)
    document = asyncapi_document(compiled, title=title, version=api_version)
    if output is not None and Path(output).suffix == ".json":
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    else:
        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    if output is None:
        click.echo(text, nl=False)
        return
    Path(output).write_text(text, encoding="utf-8")
    click.echo(f"wrote {output}", err=True)
