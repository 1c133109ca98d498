"""Supervising a mesh's processes on one machine (``mesh up``): each a child process,
restarted with backoff when it crashes, given up on when it keeps crashing, and all stopped
with SIGTERM, agents before the gateways that carry what they send while draining."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mesh.deploy.processes import Process
from mesh.deploy.spec import RestartSpec

Report = Callable[[str], None]
"""Receives what the supervisor has to say: one line per event."""
Output = Callable[[str, str], None]
"""Receives each line a process writes, with the process's name."""

SPAWN_FAILED = 127
"""The exit code a process that could not be started counts as (the shell's)."""


@dataclass
class Child:
    """One supervised process and what became of it."""

    process: Process
    command: list[str]
    env: dict[str, str]
    log: Path
    state: str = "starting"
    """``starting``, ``running``, ``restarting``, ``failed`` (given up on), ``exited`` (0, on
    its own), ``stopping``, ``stopped``, ``crashed`` (while the mesh stopped) or ``killed``
    (did not stop in time, or stopped with an error)."""
    pid: int | None = None
    restarts: int = 0
    crashes: int = 0
    """Crashes in a row, each within ``healthy_after`` of its start."""
    exit_code: int | None = None
    since: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.process.name


class Supervisor:
    """Runs ``children`` until ``stop`` is set or every one ended on its own.

    With ``output``, each child's output comes back through a pipe, line by line, to
    ``output`` and to its log file; without, it goes straight to the log file (detached: a
    child keeps logging whatever becomes of the supervisor).  ``changed`` is called after
    every change of a child's state.
    """

    def __init__(
        self,
        children: Sequence[Child],
        restart: RestartSpec,
        *,
        report: Report,
        output: Output | None = None,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.children = list(children)
        self.restart = restart
        self._report = report
        self._output = output
        self._changed = changed
        # Stopping comes in two waves: agents and the bridge, then the gateways, which
        # carry what the others send while they drain (replies, leaving the registry).
        self._stopping = asyncio.Event()
        self._gateways_stopping = asyncio.Event()
        self._pipes: set[asyncio.Task[None]] = set()
        self._started = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Supervise until ``stop``, then stop every child; or until every child ended on
        its own."""
        keepers = {child.name: asyncio.create_task(self._keep(child)) for child in self.children}
        waiter = asyncio.create_task(stop.wait())
        everyone = asyncio.create_task(asyncio.wait(keepers.values()))
        try:
            await asyncio.wait([waiter, everyone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            everyone.cancel()
            self._stopping.set()
            for gateways in (False, True):
                if gateways:
                    self._gateways_stopping.set()
                wave = [
                    keepers[child.name]
                    for child in self.children
                    if (child.process.role == "gateway") == gateways
                ]
                await asyncio.gather(*wave, return_exceptions=True)
            await asyncio.gather(*self._pipes, return_exceptions=True)

    async def started(self) -> None:
        """Returns once every child was started once (or failed to be)."""
        await self._started.wait()

    def kill(self) -> None:
        """SIGKILL to every child still running (a second Ctrl+C: stop now, not drained)."""
        for child in self.children:
            if child.pid is not None and child.state in ("running", "stopping"):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)

    async def _keep(self, child: Child) -> None:
        """Run ``child``, again after each crash, until stopping or giving up on it."""
        wave = self._gateways_stopping if child.process.role == "gateway" else self._stopping
        while not self._stopping.is_set():
            started = time.monotonic()
            code = await self._run_once(child, wave)
            if code is None:  # stopped
                return
            if code == 0:
                self._set(child, "exited", exit_code=0)
                self._report(f"{child.name} exited (exit code 0): not restarted")
                return
            if self._stopping.is_set():
                self._set(child, "crashed", exit_code=code)
                self._report(f"{child.name} ended with {exit_status(code)} while the mesh stopped")
                return
            ran = time.monotonic() - started
            child.crashes = 1 if ran >= self.restart.healthy_after else child.crashes + 1
            if child.crashes >= self.restart.give_up_after:
                self._set(child, "failed", exit_code=code)
                self._report(
                    f"{child.name} crashed {child.crashes} times in a row ({exit_status(code)}): "
                    f"giving up on it; the rest keeps running. Its log: {child.log}"
                )
                return
            delay = min(self.restart.backoff * 2 ** (child.crashes - 1), self.restart.max_backoff)
            self._set(child, "restarting", exit_code=code)
            self._report(
                f"{child.name} crashed ({exit_status(code)} after {ran:.1f} s): restarting in "
                f"{delay:g} s ({child.crashes} of {self.restart.give_up_after} crashes in a row)"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if not self._stopping.is_set():
                child.restarts += 1
                self._report(f"{child.name} restarted (restart {child.restarts})")
        self._set(child, "stopped")

    async def _run_once(self, child: Child, wave: asyncio.Event) -> int | None:
        """Start ``child`` and wait: its exit code, or ``None`` when ``wave`` came first
        and it was stopped."""
        with child.log.open("ab") as log:
            try:
                handle = await asyncio.create_subprocess_exec(
                    *child.command,
                    env=child.env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE if self._output else log,
                    stderr=asyncio.subprocess.STDOUT,
                    # A process group of its own: a terminal's Ctrl+C reaches the supervisor
                    # only, which then stops the children in order.
                    process_group=0,
                )
            except OSError as exc:
                self._report(f"{child.name} could not be started: {exc}")
                return SPAWN_FAILED
        self._set(child, "running", pid=handle.pid)
        if handle.stdout is not None:
            pipe = asyncio.create_task(self._pipe(child, handle.stdout))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)
        exited = asyncio.create_task(handle.wait())
        stopping = asyncio.create_task(wave.wait())
        await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if exited.done():
            return exited.result()
        await self._terminate(child, handle, exited)
        return None

    async def _terminate(
        self, child: Child, handle: asyncio.subprocess.Process, exited: asyncio.Task[int]
    ) -> None:
        self._set(child, "stopping")
        with contextlib.suppress(ProcessLookupError):
            handle.send_signal(signal.SIGTERM)
        timeout = child.process.stop_timeout
        try:
            code = await asyncio.wait_for(asyncio.shield(exited), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(handle.pid, signal.SIGKILL)
            self._set(child, "killed", exit_code=await exited)
            self._report(f"{child.name} did not stop within {timeout:g} s: killed")
            return
        clean = code in (0, -signal.SIGTERM)
        self._set(child, "stopped" if clean else "killed", exit_code=code)
        if not clean:
            self._report(f"{child.name} stopped with {exit_status(code)}")

    async def _pipe(self, child: Child, stream: asyncio.StreamReader) -> None:
        assert self._output is not None
        with child.log.open("ab") as log:
            async for line in stream:
                log.write(line)
                log.flush()
                self._output(child.name, line.decode(errors="replace"))

    def _set(self, child: Child, state: str, **changes: int | None) -> None:
        child.state, child.since = state, time.time()
        for key, value in changes.items():
            setattr(child, key, value)
        if all(child.state != "starting" for child in self.children):
            self._started.set()
        self._changed()


def exit_status(code: int) -> str:
    """``exit code 2``, ``killed by SIGKILL``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
