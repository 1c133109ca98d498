"""``mesh up examples/demo/mesh.yaml`` (what ``make demo`` runs): provisioned from
examples/policy.yaml, every process as its principal's broker user, and one message the
gateway denies."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import redis.asyncio as aioredis
from helpers import cli_env

from mesh import Settings
from mesh.management import ManagementAPI

ROOT = Path(__file__).resolve().parent.parent


async def test_the_demo_runs_provisioned_and_shows_a_denial(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Runs until its output shows the denial, the notice to the intruder, honest traffic, a
    schema denial and a trip log the gateway redacted (however slow the machine), then stops
    cleanly on SIGINT, as on Ctrl+C."""
    env = {
        **os.environ,
        **cli_env(settings),
        "MESH_CREDENTIALS_DIR": str(tmp_path / "creds"),
        "MESH_RUN_DIR": str(tmp_path / "run"),
    }
    api = ManagementAPI.for_settings(settings)
    vehicles = f"{settings.namespace}.vehicles"
    wanted = {
        "the gateway's denial": re.compile(
            rf"denied .* from {re.escape(vehicles)}/v9 on vehicle\.v7\.speed.*denied by default"
        ),
        "the notice to the intruder": re.compile(r"\[ *v9\] .*error notice from gateway"),
        "honest traffic": re.compile(rf"\(from v7, verified user {re.escape(vehicles)}\)"),
        "a schema denial": re.compile(
            r"denied .* on vehicle\.v9\.speed: schema: payload\.speed_kmh: a string is not of "
            r"type 'number'"
        ),
        "a redacted trip log": re.compile(
            r"monitor: vehicle\.v[78]\.trip +Sam Doe, \+\*\* \*\* \*\*\*\* 0958 +"
            r"\(redacted by the gateway: payload\.contact\)"
        ),
    }
    lines: list[str] = []
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "up", "examples/demo/mesh.yaml",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(90):
                while wanted:
                    line = (await process.stdout.readline()).decode(errors="replace")
                    assert line, "the demo ended early:\n" + "".join(lines)
                    lines.append(line)
                    wanted = {k: v for k, v in wanted.items() if not v.search(line)}
        except TimeoutError:
            raise AssertionError(f"no {', '.join(wanted)} in:\n{''.join(lines)}") from None
        finally:
            process.send_signal(signal.SIGINT)
            rest, _ = await asyncio.wait_for(process.communicate(), 60)
            lines.append(rest.decode(errors="replace"))
    finally:
        for user in await api.users():
            if user.name.startswith(f"{settings.namespace}."):
                await api.delete_user(user.name)
        for name in await redis.acl_users():
            if name.startswith(f"{settings.namespace}."):
                await redis.acl_deluser(name)
    assert process.returncode == 0, "".join(lines)
