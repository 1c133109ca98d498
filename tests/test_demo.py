"""``mesh up examples/demo/mesh.yaml`` (what ``make demo`` runs): provisioned from
examples/policy.yaml, every process as its principal's broker user, one message the gateway
denies, and the bridge with the dashboard's URL and a fresh token that publishes as the
README's curl does."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from helpers import cli_env, free_port

from mesh import Settings
from mesh.management import ManagementAPI
from mesh.policy import TokenStore, load_policy

ROOT = Path(__file__).resolve().parent.parent


async def test_the_demo_runs_provisioned_and_shows_a_denial(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Runs until its output shows the denial, the notice to the intruder, honest traffic, a
    schema denial, a trip log the gateway redacted and the dashboard's URL with a new token
    (however slow the machine); the token publishes on notes.today, the dashboard user's
    token from before is revoked; then it stops cleanly on SIGINT, as on Ctrl+C.

    The demo's spec and policy are copied, so the tokens file is the test's own, and the
    bridge given a free port."""
    port = free_port()
    (tmp_path / "demo").mkdir()
    spec = tmp_path / "demo" / "mesh.yaml"
    demo = (ROOT / "examples" / "demo" / "mesh.yaml").read_text()
    assert "  port: 8080\n" in demo
    spec.write_text(demo.replace("  port: 8080\n", f"  port: {port}\n"))
    shutil.copy(ROOT / "examples" / "policy.yaml", tmp_path / "policy.yaml")
    tokens = TokenStore.for_policy(load_policy(tmp_path / "policy.yaml"))
    before = tokens.issue("dashboard")
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
        "the dashboard's URL": re.compile(
            rf"^dashboard: http://127\.0\.0\.1:{port}/\?access_token=(mesh_[\w-]+)$"
        ),
        "the token for curl": re.compile(r"^TOKEN=(mesh_[\w-]+) "),
    }
    found: dict[str, str] = {}
    lines: list[str] = []
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "up", str(spec),
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
                    for what, pattern in list(wanted.items()):
                        match = pattern.search(line)
                        if match:
                            found[what] = match[match.lastindex or 0]
                            del wanted[what]
            token = found["the dashboard's URL"]
            assert found["the token for curl"] == token != before
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                # The README's curl: POST /topics/notes.today with the printed token.
                answer = await http.post(
                    "/topics/notes.today",
                    json={"text": "hi"},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert answer.status_code == 202, answer.text
                assert "message_id" in answer.json()
                stale = await http.get("/agents", headers={"Authorization": f"Bearer {before}"})
                assert stale.status_code == 401, stale.text
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
