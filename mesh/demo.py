"""The demo mesh behind ``mesh demo``: real processes, their output interleaved."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

DEMO_PROCESSES: list[tuple[str, list[str]]] = [
    ("gateway", ["gateway"]),
    ("v7", ["run", "examples.vehicles:Vehicle", "--id", "v7"]),
    ("v8", ["run", "examples.vehicles:Vehicle", "--id", "v8"]),
    ("monitor", ["run", "examples.vehicles:Monitor", "--id", "monitor"]),
]


async def _pipe(name: str, stream: asyncio.StreamReader) -> None:
    async for line in stream:
        sys.stdout.write(f"[{name:>7}] {line.decode(errors='replace')}")
        sys.stdout.flush()


async def run_demo(seconds: float = 0.0) -> int:
    """Start the demo processes; stop them all on Ctrl+C, SIGTERM or after ``seconds``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    processes: list[asyncio.subprocess.Process] = []
    pipes: list[asyncio.Task[None]] = []
    try:
        for name, args in DEMO_PROCESSES:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mesh.cli",
                *args,
                "--log-level",
                "warning",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            assert process.stdout is not None
            processes.append(process)
            pipes.append(asyncio.create_task(_pipe(name, process.stdout)))
        sys.stdout.write(
            "demo mesh running: gateway, vehicles v7 and v8, monitor (Ctrl+C to stop)\n"
        )
        sys.stdout.flush()
        exited = asyncio.ensure_future(
            asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in processes],
                return_when=asyncio.FIRST_COMPLETED,
            )
        )
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait(
            [exited, waiter], timeout=seconds or None, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        exited.cancel()
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 15)
            if process.returncode is None:
                process.kill()
        await asyncio.gather(*pipes, return_exceptions=True)
    failed = [
        name
        for (name, _), p in zip(DEMO_PROCESSES, processes, strict=False)
        if p.returncode not in (0, -signal.SIGTERM)
    ]
    if failed:
        sys.stdout.write(f"demo: {', '.join(failed)} exited with an error\n")
        return 1
    return 0
