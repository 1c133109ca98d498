"""``mesh up``: a mesh spec run as supervised processes, each as its principal, on the real
broker and Redis: restarts, giving up, Ctrl+C, ``--detach`` with ``status``, ``logs`` and
``down``, and a bad spec named by file, line and path."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from helpers import cli_env, eventually, free_port

from mesh import Settings
from mesh.deploy.rundir import RunDir, RunState
from mesh.management import ManagementAPI
from mesh.registry import Registry

ROOT = Path(__file__).resolve().parent.parent

FAST_RESTARTS = """
restart:
  backoff: 0.1
  give_up_after: 3
"""


class Mesh:
    """A spec and its policy in a directory of the test's, and ``mesh`` commands run on the
    test's vhost and namespace, with credentials and run directory of the test's own."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        self.directory = directory
        self.spec = directory / "mesh.yaml"
        self.run = RunDir(directory / "run" / "test")
        shutil.copy(ROOT / "examples" / "policy.yaml", directory / "policy.yaml")
        self.env = {
            **os.environ,
            **cli_env(settings),
            "MESH_CREDENTIALS_DIR": str(directory / "creds"),
            "MESH_RUN_DIR": str(directory / "run"),
        }
        self.lines: list[str] = []
        self._seen = 0

    def write(self, body: str) -> None:
        self.spec.write_text(f"name: test\npolicy: policy.yaml\n{body}")

    async def command(self, *args: str) -> tuple[int, str]:
        """``mesh ARGS`` to its end: exit code and output (stdout and stderr)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", *args,
            cwd=ROOT, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 90)
        return int(process.returncode or 0), out.decode(errors="replace")

    async def up(self) -> asyncio.subprocess.Process:
        """``mesh up`` in the foreground, as from a terminal; its output is read as it comes
        (``expect``), so it never blocks on a full pipe."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "up", str(self.spec),
            cwd=ROOT, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        assert process.stdout is not None
        self._reader = asyncio.create_task(self._read(process.stdout))
        return process

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.lines.append(line.decode(errors="replace"))

    async def expect(self, pattern: str, timeout: float = 45) -> re.Match[str]:
        """The first line from here on that matches ``pattern``."""
        wanted = re.compile(pattern)

        def found() -> re.Match[str] | None:
            while self._seen < len(self.lines):
                match = wanted.search(self.lines[self._seen])
                self._seen += 1
                if match:
                    return match
            return None

        try:
            return await eventually(found, timeout=timeout, interval=0.05)
        except AssertionError:
            raise AssertionError(f"no {pattern!r} in:\n{''.join(self.lines)}") from None

    async def stop(self, process: asyncio.subprocess.Process) -> int:
        """Ctrl+C: SIGINT to ``mesh up``, and its exit code."""
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 90)
        await self._reader
        return code

    def state(self) -> RunState:
        state = self.run.read()
        assert state is not None
        return state

    def pid(self, name: str) -> int:
        process = next(p for p in self.state().processes if p.name == name)
        assert process.pid is not None and process.state == "running", process
        return process.pid.pid


@pytest.fixture
async def mesh(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[Mesh]:
    """A directory for a spec; afterwards the broker and Redis users provisioning made are
    removed, and any process left running is killed."""
    made = Mesh(settings, tmp_path)
    try:
        yield made
    finally:
        state = made.run.read()
        for process in state.processes if state is not None else []:
            if process.pid is not None and process.pid.alive():
                os.killpg(process.pid.pid, signal.SIGKILL)
        if state is not None and state.supervisor.alive():
            os.kill(state.supervisor.pid, signal.SIGKILL)
        api = ManagementAPI.for_settings(settings)
        for user in await api.users():
            if user.name.startswith(f"{settings.namespace}."):
                await api.delete_user(user.name)
        for name in await redis.acl_users():
            if name.startswith(f"{settings.namespace}."):
                await redis.acl_deluser(name)


def registry(settings: Settings, redis: aioredis.Redis) -> Registry:
    return Registry(redis, settings.namespace, settings.heartbeat_ttl)


async def test_a_crashed_agent_is_restarted_and_registers_again(
    mesh: Mesh, settings: Settings, redis: aioredis.Redis
) -> None:
    """SIGKILL to an agent: the console says it crashed and is restarted, and a new process
    (another pid) registers as the same agent."""
    mesh.write(
        "agents:\n  - {id: v7, class: 'examples.vehicles:Vehicle'}\n" + FAST_RESTARTS
    )
    process = await mesh.up()
    await mesh.expect(r"^logs: ")
    first = mesh.pid("v7")
    await eventually(
        lambda: _registered(settings, redis, "v7", first), timeout=45, what="v7 registered"
    )
    os.kill(first, signal.SIGKILL)
    await mesh.expect(r"mesh up: v7 crashed \(killed by SIGKILL after .* s\): restarting in")
    await mesh.expect(r"mesh up: v7 restarted \(restart 1\)")
    second = await eventually(lambda: mesh.pid("v7") != first and mesh.pid("v7"), timeout=30)
    await eventually(
        lambda: _registered(settings, redis, "v7", second), timeout=45, what="v7 back"
    )
    assert next(p for p in mesh.state().processes if p.name == "v7").restarts == 1
    assert await mesh.stop(process) == 0, "".join(mesh.lines)


async def test_a_process_that_keeps_crashing_is_given_up_on_and_the_rest_runs(
    mesh: Mesh, settings: Settings, redis: aioredis.Redis
) -> None:
    """An agent whose class does not import crashes at each start: after three crashes in a
    row it is given up on, saying so, while the gateway and the other agent keep running."""
    mesh.write(
        "agents:\n"
        "  - {id: v7, class: 'examples.vehicles:Vehicle'}\n"
        "  - {id: v8, class: 'examples.nowhere:Vehicle'}\n" + FAST_RESTARTS
    )
    process = await mesh.up()
    await mesh.expect(r"mesh up: v8 crashed \(exit code 2 after .*\): restarting in 0\.1 s")
    await mesh.expect(
        r"mesh up: v8 crashed 3 times in a row \(exit code 2\): giving up on it; the rest "
        r"keeps running\. Its log: .*v8\.log"
    )
    assert "cannot import 'examples.nowhere'" in mesh.run.log("v8").read_text()
    await eventually(
        lambda: _registered(settings, redis, "v7", mesh.pid("v7")), timeout=45, what="v7 up"
    )
    states = {p.name: p.state for p in mesh.state().processes}
    assert states == {"gateway": "running", "v7": "running", "v8": "failed"}
    assert await mesh.stop(process) == 0, "".join(mesh.lines)


async def test_ctrl_c_stops_every_process_and_exits_0(
    mesh: Mesh, settings: Settings, redis: aioredis.Redis
) -> None:
    """SIGINT to mesh up: every process is sent SIGTERM, leaves the registry and exits; mesh
    up exits 0 and its state says each one stopped."""
    mesh.write(
        "gateway: {replicas: 2}\n"
        "agents:\n  - {id: v7, class: 'examples.vehicles:Vehicle', replicas: 2}\n"
    )
    process = await mesh.up()
    await mesh.expect(r"^logs: ")
    pids = {name: mesh.pid(name) for name in ("gateway-1", "gateway-2", "v7-1", "v7-2")}
    for pid in (pids["v7-1"], pids["v7-2"]):
        await eventually(
            lambda pid=pid: _registered(settings, redis, "v7", pid), timeout=45, what="v7s"
        )
    assert await mesh.stop(process) == 0, "".join(mesh.lines)
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) still runs"
    assert {p.name: p.state for p in mesh.state().processes} == dict.fromkeys(pids, "stopped")
    assert await registry(settings, redis).instances(agent="v7") == []


async def test_detached_with_status_logs_and_down(mesh: Mesh) -> None:
    """--detach returns once every process started; the bridge answers at the URL it names,
    status lists the processes, logs shows one's output, down stops them all, after which
    status says it is not running."""
    port = free_port()
    mesh.write(
        "log_level: info\n"
        "agents:\n  - {id: v7, class: 'examples.vehicles:Vehicle'}\n"
        f"bridge: {{port: {port}}}\n"
    )
    code, out = await mesh.command("up", str(mesh.spec), "--detach")
    assert code == 0, out
    assert re.search(r"mesh test running detached \(mesh up pid \d+\)", out), out
    assert f"bridge: http://127.0.0.1:{port}/\n" in out, out
    pids = {name: mesh.pid(name) for name in ("gateway", "v7", "bridge")}
    health = await eventually(lambda: _get(f"http://127.0.0.1:{port}/health"), timeout=45)
    assert json.loads(health)["agent"] == "bridge"

    code, out = await mesh.command("status")
    assert code == 0, out
    for name, pid in pids.items():
        assert re.search(rf"^  {name} +running +{pid} +0 ", out, re.MULTILINE), out

    await eventually(lambda: "v7" in mesh.run.log("v7").read_text(), timeout=45)
    code, out = await mesh.command("logs", "v7", "--mesh", "test")
    assert code == 0 and "v7" in out, out
    assert out in mesh.run.log("v7").read_text()

    code, out = await mesh.command("down")
    assert code == 0, out
    assert re.search(r"^  v7 +stopped ", out, re.MULTILINE), out
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) still runs"
    code, out = await mesh.command("status")
    assert code == 1 and "not running" in out, out


async def test_a_bad_spec_names_the_file_the_line_the_path_and_why(tmp_path: Path) -> None:
    """Before anything is provisioned or started (test_mesh_spec.py has more such cases)."""
    shutil.copy(ROOT / "examples" / "policy.yaml", tmp_path / "policy.yaml")
    spec = tmp_path / "mesh.yaml"
    spec.write_text(
        "name: test\npolicy: policy.yaml\n"
        "agents:\n  - id: v7\n    class: examples.vehicles:Vehicle\n    replicas: two\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.cli", "up", str(spec),
        cwd=ROOT,
        env={**os.environ, "MESH_RUN_DIR": str(tmp_path / "run")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, (out, err)
    assert err.decode() == f"{spec}:6: agents[0].replicas: expected a whole number, got 'two'\n"
    assert not (tmp_path / "run").exists()


async def _registered(settings: Settings, redis: aioredis.Redis, agent: str, pid: int) -> bool:
    instances = await registry(settings, redis).instances(agent=agent)
    return any(instance.pid == pid for instance in instances)


async def _get(url: str) -> bytes | None:
    def get() -> bytes | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body: bytes = response.read()
                return body
        except OSError:
            return None

    return await asyncio.to_thread(get)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
