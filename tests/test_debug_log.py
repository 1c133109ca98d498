"""At log level DEBUG (``mesh run --log-level debug``) each message handled is one line:
behaviour, topic, id, outcome and duration."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from agents_reliability import host, subscriber
from helpers import cli_env, eventually, running, take

from behaviours import SubscriberBehaviour
from mesh import Client, Message, Settings, on
from mesh.gateway import Gateway

ROOT = Path(__file__).resolve().parent.parent


class Audited(SubscriberBehaviour):
    retry_delays = (0.05,)

    @on("job.*")
    async def job(self, msg: Message, payload: dict[str, bool]) -> None:
        host(self).seen.put_nowait(msg.attempt)
        if payload.get("fail") and msg.attempt == 1:
            raise ValueError("not yet")


async def test_each_message_handled_is_logged_at_debug(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mesh.behaviour")
    worker = subscriber(settings, Audited, agent_id="worker")
    client = Client(settings=settings)
    async with running(Gateway(settings=settings), worker, client):
        fine = await client.publish("job.ok", {})
        flaky = await client.publish("job.flaky", {"fail": True})
        await take(worker.seen, 3)

        def lines(message_id: str) -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.DEBUG and message_id in r.getMessage()
            ]

        await eventually(lambda: len(lines(flaky)) == 2)
    [ok] = lines(fine)
    assert re.fullmatch(rf"audited job\.ok {fine}: handled in \d+\.\d ms", ok)
    retried, handled = lines(flaky)
    assert re.fullmatch(
        rf"audited job\.flaky {flaky}: failed \(ValueError\), retry 2 in 0\.05s in \d+\.\d ms",
        retried,
    )
    assert handled.startswith(f"audited job.flaky {flaky}: handled in ")


async def test_mesh_run_at_debug_shows_the_mesh_lines_not_the_libraries_frames(
    settings: Settings,
) -> None:
    """``mesh run --log-level debug``: the line per message is there, aiormq's line per frame
    and mode's lifecycle lines are not (they buried it: 199 of an agent's first 217 lines)."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "mesh.cli", "run", "examples.vehicles:Vehicle"),
        *("--id", "v7", "--log-level", "debug"),
        env={**os.environ, **cli_env(settings), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []

    async def line_with(text: str) -> str:
        async with asyncio.timeout(30):
            while True:
                line = (await process.stderr.readline()).decode()  # type: ignore[union-attr]
                assert line, f"mesh run ended before {text!r}:\n" + "".join(lines)
                lines.append(line)
                if text in line:
                    return line

    client = Client(settings=settings)
    try:
        async with running(Gateway(settings=settings), client):
            await line_with("agent v7/")
            alert = {"vehicle": "v7", "speed_kmh": 150, "limit_kmh": 120}
            sent = await client.publish("alerts.speeding.v7", alert)
            handled = await line_with(sent)
            process.send_signal(signal.SIGINT)
            _, rest = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines += rest.decode().splitlines(keepends=True)
    assert re.search(rf"DEBUG .* brake alerts\.speeding\.v7 {sent}: handled in ", handled)
    assert process.returncode == 0, "".join(lines)
    for noise in ("aiormq", "aio_pika", "Starting...", "Gathering", "Closing event loop"):
        assert not [line for line in lines if noise in line], noise
