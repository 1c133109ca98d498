"""How ``mesh up`` starts a process of the mesh on this machine: the ``mesh`` command line,
and an environment holding the principal's credentials, the policy, the spec's settings and,
for gateways, the audit key."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

from mesh.config import ENV_PREFIX, Settings
from mesh.deploy.processes import Process
from mesh.provision.credentials import write_private

AUDIT_KEY_FILE = "audit.key"


def command(process: Process) -> list[str]:
    """The command line: this interpreter's ``mesh``."""
    return [sys.executable, "-m", "mesh.cli", *process.args]


def environment(
    process: Process,
    *,
    inherited: Mapping[str, str],
    credentials: Mapping[str, str],
    policy: Path,
    audit_key: Path | None = None,
) -> dict[str, str]:
    """``inherited`` without its mesh settings, then the principal's ``credentials``
    (``MESH_AMQP_URL``, ``MESH_REDIS_URL``, ``MESH_NAMESPACE``), the policy, and what the
    spec sets.  *Why not the caller's settings:* ``mesh up`` runs as a broker administrator,
    whose URLs are no process's business; the spec says what each process gets."""
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    env = {key: value for key, value in inherited.items() if key not in settings}
    env.update(credentials)
    env["MESH_POLICY"] = str(policy.resolve())
    env["PYTHONUNBUFFERED"] = "1"  # each line in the log as it is written
    if process.role == "gateway" and audit_key is not None:
        env["MESH_AUDIT_KEY_FILE"] = str(audit_key)
    env.update(process.env)
    return env


def audit_key(directory: Path) -> Path:
    """The gateways' audit key, made once beside the credentials (mode 0600) and kept, so
    the trail of every run verifies with it."""
    path = (directory / AUDIT_KEY_FILE).resolve()
    if not path.exists():
        write_private(path, secrets.token_hex(32) + "\n")
    return path
