"""The demo mesh behind ``mesh demo``: provisioned from a policy, real processes, their output
interleaved."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from pathlib import Path

from mesh.provision import CredentialStore, credentials_dir
from mesh.provision.credentials import write_private

DEMO_POLICY = Path("examples/policy.yaml")

DEMO_PROCESSES: list[tuple[str, str, list[str]]] = [
    # (name, principal it runs as, mesh command)
    ("gateway", "gateway", ["gateway"]),
    ("v7", "vehicles", ["run", "examples.vehicles:Vehicle", "--id", "v7"]),
    ("v8", "vehicles", ["run", "examples.vehicles:Vehicle", "--id", "v8"]),
    ("monitor", "monitor", ["run", "examples.vehicles:Monitor", "--id", "monitor"]),
    ("v9", "vehicles", ["run", "examples.vehicles:Intruder", "--id", "v9"]),
]


async def _pipe(name: str, stream: asyncio.StreamReader) -> None:
    async for line in stream:
        sys.stdout.write(f"[{name:>9}] {line.decode(errors='replace')}")
        sys.stdout.flush()


async def _mesh(name: str, args: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    return process


async def _provision(policy: Path) -> bool:
    process = await _mesh("provision", ["provision", str(policy)], dict(os.environ))
    assert process.stdout is not None
    await _pipe("provision", process.stdout)
    return await process.wait() == 0


async def run_demo(seconds: float = 0.0, policy: Path = DEMO_POLICY) -> int:
    """Provision the demo policy, start the demo processes, each as its principal's broker
    user; stop them all on Ctrl+C, SIGTERM or after ``seconds``."""
    if not await _provision(policy):
        sys.stdout.write("demo: provisioning failed (see above)\n")
        return 1
    store = CredentialStore(credentials_dir(policy))
    audit_key = _audit_key(store.directory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    processes: list[asyncio.subprocess.Process] = []
    pipes: list[asyncio.Task[None]] = []
    try:
        for name, principal, args in DEMO_PROCESSES:
            env = {**os.environ, **(store.variables(principal) or {}), "MESH_POLICY": str(policy)}
            if principal == "gateway":
                env["MESH_AUDIT_KEY_FILE"] = str(audit_key)
            process = await _mesh(name, [*args, "--log-level", "warning"], env)
            assert process.stdout is not None
            processes.append(process)
            pipes.append(asyncio.create_task(_pipe(name, process.stdout)))
        sys.stdout.write(
            f"demo mesh running under {policy}: gateway, vehicles v7 and v8, monitor, and v9, "
            "which tries to speak for v7 (Ctrl+C to stop)\n"
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
        for (name, _, _), p in zip(DEMO_PROCESSES, processes, strict=False)
        if p.returncode not in (0, -signal.SIGTERM)
    ]
    sys.stdout.write(
        f"demo: the gateway's audit trail verifies with: MESH_AUDIT_KEY_FILE={audit_key} "
        "mesh audit verify\n"
    )
    if failed:
        sys.stdout.write(f"demo: {', '.join(failed)} exited with an error\n")
        return 1
    return 0


def _audit_key(directory: Path) -> Path:
    """The demo gateway's audit key, made once beside the credentials (mode 0600) and kept,
    so the trail of every demo run verifies with it."""
    path = (directory / "audit.key").resolve()
    if not path.exists():
        write_private(path, secrets.token_hex(32) + "\n")
    return path
