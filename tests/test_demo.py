"""``mesh demo`` (what ``make demo`` runs): provisioned from examples/policy.yaml, every
process as its principal's broker user, and one message the gateway denies."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from helpers import cli_env

from mesh import Settings
from mesh.management import ManagementAPI

ROOT = Path(__file__).resolve().parent.parent


async def test_the_demo_runs_provisioned_and_shows_a_denial(
    settings: Settings, tmp_path: Path
) -> None:
    env = {**os.environ, **cli_env(settings), "MESH_CREDENTIALS_DIR": str(tmp_path / "creds")}
    api = ManagementAPI.for_settings(settings)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "demo", "--seconds", "6",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 90)
    finally:
        for user in await api.users():
            if user.name.startswith(f"{settings.namespace}."):
                await api.delete_user(user.name)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    vehicles = f"{settings.namespace}.vehicles"
    assert "denied by default" in text and "from " + vehicles + "/v9 on vehicle.v7.speed" in text
    assert "error notice from gateway" in text  # the intruder was told at once
    assert f"(from v7, verified user {vehicles})" in text  # the honest traffic flows
