"""Agents that tests/test_agent_registry.py and tests/test_agent_state.py run as subprocesses
(``mesh run tests.agents_registry:…``) or in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from behaviours import OneShotBehaviour, SubscriberBehaviour
from mesh import Agent, Message, Settings, on

SLEEPER_TOPIC = "sleeper.poke"


class Poke(SubscriberBehaviour):
    """Bound to ``sleeper.poke``; does nothing with what it gets."""

    @on(SLEEPER_TOPIC)
    async def poke(self, msg: Message, payload: object) -> None:
        return None


class Sleeper(Agent):
    """Registers, heartbeats, and otherwise waits to be killed."""

    capabilities = ["sleeping"]
    behaviours = [Poke]
    version = "7.1"

    def metadata(self) -> dict[str, Any]:
        return {"role": "sleeper"}


class Count(BaseModel):
    count: int = 0


INCREMENTS = 1000
REPLICAS = 2


class Increment(OneShotBehaviour):
    """Once ``REPLICAS`` instances of the agent are registered, adds 1 to the agent's
    ``count`` ``INCREMENTS`` times through ``update_state``, then ends with exit code 0."""

    async def run(self) -> int | None:
        agent = self.agent
        assert isinstance(agent, Counter)
        # Start together, so the replicas' compare-and-set writes really contend.
        while len(await agent.registry.instances(agent=agent.id)) < REPLICAS:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # polls Redis, which no local event can stand in for
        for _ in range(INCREMENTS):
            await agent.update_state(lambda s: {"count": s.count + 1})
        return 0


class Counter(Agent):
    """An agent whose state is a counter, incremented by its ``increment`` behaviour."""

    state_model = Count
    behaviours = [Increment]


# --- running these agents as processes ----------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def mesh_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a ``mesh`` process use ``settings``."""
    env = dict(os.environ)
    env.update(
        MESH_AMQP_URL=settings.amqp_url,
        MESH_REDIS_URL=settings.redis_url,
        MESH_NAMESPACE=settings.namespace,
        MESH_HEARTBEAT_INTERVAL=str(settings.heartbeat_interval),
        MESH_HEARTBEAT_TTL=str(settings.heartbeat_ttl),
        **extra,
    )
    return env


class MeshProcess:
    """A ``mesh run`` subprocess whose output goes to a log file."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def check_running(self) -> None:
        """Raise (not AssertionError, so ``eventually`` stops at once) if the process ended."""
        if self.process.returncode is not None:
            raise RuntimeError(
                f"mesh process exited with {self.process.returncode}:\n{self.output()}"
            )

    async def kill(self) -> None:
        """SIGKILL: no drain, no deregistration."""
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the drain; the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(timeout):
            return await self.process.wait()


@asynccontextmanager
async def mesh_run(
    settings: Settings, agent_class: str, agent_id: str, instance: str, log_dir: Path
) -> AsyncIterator[MeshProcess]:
    """Run ``mesh run tests.agents_registry:<agent_class>`` until the block ends."""
    log = log_dir / f"{agent_id}-{instance}.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mesh.cli",
            "run",
            f"tests.agents_registry:{agent_class}",
            "--id",
            agent_id,
            "--instance",
            instance,
            cwd=ROOT,
            env=mesh_env(settings),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
        )
    proc = MeshProcess(process, log)
    try:
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def mesh_cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    """Run ``mesh <args>``; its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.cli",
        *args,
        cwd=ROOT,
        env=mesh_env(settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
