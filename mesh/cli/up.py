"""``mesh up``: run a whole mesh from its spec (``mesh.deploy``), supervised; ``mesh status``,
``mesh logs`` and ``mesh down`` for a running one; ``mesh demo``, the demo mesh."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from mesh.cli.common import echo_table, example, settings_or_exit
from mesh.cli.policy import load_policy_or_exit
from mesh.cli.provision import provision_policy
from mesh.deploy import MeshSpec, SpecError, load_spec
from mesh.deploy.launch import audit_key, command, environment
from mesh.deploy.processes import Process, plan
from mesh.deploy.rundir import (
    DEFAULT_BASE,
    Pid,
    ProcessState,
    RunDir,
    RunState,
    find_run,
    rotate,
)
from mesh.deploy.supervisor import Child, Supervisor, exit_status
from mesh.policy import Policy, TokenError, TokenStore
from mesh.provision import CredentialStore, credentials_dir

F = TypeVar("F", bound=Callable[..., Any])

DEMO_SPEC = Path("examples/demo/mesh.yaml")
DETACH_TIMEOUT = 60.0
"""Seconds ``mesh up --detach`` waits for its supervisor to have started every process."""
BRIDGE_TIMEOUT = 30.0
"""Seconds ``mesh up`` waits for the bridge to answer before printing the dashboard's URL."""
_SETTLED = ("running", "failed", "exited", "stopped", "killed")


def _run_dir_option(func: F) -> F:
    return click.option(
        "--run-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="MESH_RUN_DIR",
        default=DEFAULT_BASE,
        show_default=True,
        help="Where mesh up keeps each mesh's state and logs, in <mesh>/ (MESH_RUN_DIR).",
    )(func)


def _mesh_option(func: F) -> F:
    return click.option(
        "--mesh",
        "mesh_name",
        default=None,
        help="The mesh, by its spec's name (default: the only one running).",
    )(func)


@click.command(
    epilog=example(
        "mesh up examples/demo/mesh.yaml",
        "mesh up mesh.yaml --detach && mesh status",
        "mesh up mesh.yaml --no-provision",
    )
)
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-d", "--detach", is_flag=True,
    help="Run in the background; see it with mesh status and mesh logs, stop it with mesh down.",
)
@click.option(
    "--no-provision", is_flag=True,
    help="Use the credentials provisioned before; change no broker or Redis user.",
)
@_run_dir_option
@click.option("--supervise", is_flag=True, hidden=True)  # what --detach runs in the background
def up(spec_file: str, detach: bool, no_provision: bool, run_dir: Path, supervise: bool) -> None:
    """Run the mesh SPEC_FILE (mesh.yaml) describes, until Ctrl+C.

    First provisions its policy (as mesh provision does), then starts the gateway's
    replicas, each agent's replicas (mesh run) and the bridge, each as a child process
    connecting as its policy principal's broker and Redis user.  A process that crashes is
    restarted after a growing delay; one that keeps crashing is given up on, and the rest
    keeps running.  Each process's output goes to its log file under the run directory and,
    unless --detach, to the console prefixed with its name.  Ctrl+C (or SIGTERM, or mesh
    down) stops the agents and the bridge, which finish what they are handling, then the
    gateways; exit 0 when every process stopped cleanly.

    With the bridge's token_for (for demos: the token shows on the console), a new token of
    that user is issued at each start, the one before revoked, and printed with the
    dashboard's URL once the bridge answers.
    """
    spec = _load_spec(spec_file)
    policy = load_policy_or_exit(str(spec.policy), 1)
    try:
        processes = plan(spec, policy)
    except SpecError as exc:
        raise click.ClickException(str(exc)) from None
    run = RunDir(run_dir / spec.name)
    running = run.running()
    if running is not None:
        raise click.ClickException(
            f"mesh {spec.name} is running already (mesh up, pid {running.supervisor.pid}): "
            f"mesh down --mesh {spec.name} first"
        )
    store = CredentialStore(credentials_dir(spec.policy))
    if not (no_provision or supervise):
        click.echo(f"mesh up: provisioning {spec.policy}")
        provision_policy(
            policy, store, settings_or_exit(), echo=lambda line: click.echo(f"[provision] {line}")
        )
    children, key = _children(spec, processes, store, run)
    token = None if supervise else _fresh_token(spec, policy)
    if detach:
        sys.exit(_detach(spec_file, run, token))
    sys.exit(asyncio.run(_supervise(spec, run, children, key, detached=supervise, token=token)))


@click.command(epilog=example("mesh demo", "mesh demo --detach"))
@click.option("-d", "--detach", is_flag=True, help="As mesh up --detach.")
@_run_dir_option
@click.pass_context
def demo(ctx: click.Context, detach: bool, run_dir: Path) -> None:
    """Run the demo mesh: mesh up examples/demo/mesh.yaml (a gateway, two vehicles, a
    monitor, and an intruder whose spoofed reading the gateway denies)."""
    if not DEMO_SPEC.is_file():
        raise click.ClickException(
            f"{DEMO_SPEC} not found: run `mesh demo` (or `make demo`) from the repository"
        )
    ctx.invoke(up, spec_file=str(DEMO_SPEC), detach=detach, run_dir=run_dir)


@click.command(epilog=example("mesh status", "mesh status --mesh demo"))
@_mesh_option
@_run_dir_option
def status(mesh_name: str | None, run_dir: Path) -> None:
    """Show each process of a mesh mesh up runs: its state, pid, restarts and log.

    Exit 1 when the mesh is not running (its last state is shown).
    """
    run, state = _find(run_dir, mesh_name)
    alive = state.supervisor.alive()
    since = time.strftime("%H:%M:%S", time.localtime(state.started))
    how = "detached" if state.detached else "in a terminal"
    click.echo(
        f"mesh {state.mesh} ({state.spec}): "
        + (f"up since {since}, {how} (mesh up pid {state.supervisor.pid})" if alive else
           "not running; its processes as last seen:")
    )
    _echo_processes(state)
    if state.bridge_url and alive:
        click.echo(f"bridge: {state.bridge_url}")
    click.echo(f"logs: {run.logs}/<name>.log (mesh logs NAME)")
    if not alive:
        sys.exit(1)


@click.command(
    epilog=example(
        "mesh logs v7",
        "mesh logs gateway --follow",
        "mesh logs --lines 20",
        "mesh logs v7 --mesh demo",
    )
)
@click.argument("name", required=False)
@_mesh_option
@_run_dir_option
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines from the end.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what is written (Ctrl+C ends).")
def logs(name: str | None, mesh_name: str | None, run_dir: Path, lines: int, follow: bool) -> None:
    """Print the log of process NAME of a mesh mesh up runs; without NAME, mesh up's own
    output (restarts, processes given up on) when it runs detached."""
    run, state = _find(run_dir, mesh_name)
    path = run.supervisor_log if name is None else run.log(name)
    if not path.is_file():
        names = ", ".join(process.name for process in state.processes)
        what = f"no process {name!r}" if name is not None else "no output of mesh up itself"
        raise click.ClickException(f"{what} in mesh {state.mesh} (processes: {names})")
    with path.open("rb") as file:
        for line in _tail(file.read(), lines):
            click.echo(line.decode(errors="replace"), nl=False)
        while follow:
            chunk = file.read()
            if chunk:
                click.echo(chunk.decode(errors="replace"), nl=False)
            elif not state.supervisor.alive():
                return
            else:
                time.sleep(0.2)


@click.command(epilog=example("mesh down", "mesh down --mesh demo"))
@_mesh_option
@_run_dir_option
@click.option(
    "--timeout", default=120.0, show_default=True,
    help="Seconds to wait for every process to drain and exit.",
)
def down(mesh_name: str | None, run_dir: Path, timeout: float) -> None:
    """Stop a mesh mesh up runs (detached or in another terminal), as Ctrl+C would: agents
    and the bridge finish what they are handling, then the gateways stop."""
    run, state = _find(run_dir, mesh_name)
    deadline = time.monotonic() + timeout
    if state.supervisor.alive():
        click.echo(f"mesh down: stopping mesh {state.mesh} (mesh up pid {state.supervisor.pid})")
        os.kill(state.supervisor.pid, signal.SIGTERM)
        _wait_until(lambda: not state.supervisor.alive(), deadline)
        if state.supervisor.alive():
            raise click.ClickException(
                f"mesh up (pid {state.supervisor.pid}) still runs after {timeout:g} s"
            )
    else:
        # mesh up itself is gone (killed): stop what it left running.
        orphans = [p.pid for p in state.processes if p.pid is not None and p.pid.alive()]
        if not orphans:
            click.echo(f"mesh down: mesh {state.mesh} is not running")
            return
        click.echo(f"mesh down: mesh up is gone; stopping the {len(orphans)} processes it left")
        for pid in orphans:
            os.kill(pid.pid, signal.SIGTERM)
        _wait_until(lambda: not any(pid.alive() for pid in orphans), deadline)
        for pid in orphans:
            if pid.alive():
                os.killpg(pid.pid, signal.SIGKILL)
        return
    final = run.read() or state
    _echo_processes(final)
    if any(p.state not in ("stopped", "exited", "failed") for p in final.processes):
        sys.exit(1)


# Running


def _load_spec(path: str) -> MeshSpec:
    try:
        return load_spec(path)
    except SpecError as exc:
        for line in exc.lines():
            click.echo(line, err=True)
    except OSError as exc:
        click.echo(f"{path}: cannot read: {exc.strerror}", err=True)
    raise SystemExit(1)


def _children(
    spec: MeshSpec, processes: list[Process], store: CredentialStore, run: RunDir
) -> tuple[list[Child], Path]:
    """Each process with its command line, environment and log; and the gateways' audit
    key file (the spec's audit_key_file, else one made beside the credentials)."""
    given = spec.gateway.settings.get("audit_key_file")
    key = Path(given) if isinstance(given, str) else audit_key(store.directory)
    children = []
    for process in processes:
        credentials = store.variables(process.principal)
        if credentials is None:
            raise click.ClickException(
                f"no credentials of principal {process.principal!r} in {store.directory}: "
                "run mesh up without --no-provision (or mesh provision)"
            )
        env = environment(
            process,
            inherited=os.environ,
            credentials=credentials,
            policy=spec.policy,
            audit_key=key,
        )
        children.append(Child(process, command(process), env, run.log(process.name)))
    return children, key


def _fresh_token(spec: MeshSpec, policy: Policy) -> str | None:
    """A new token of the bridge's ``token_for`` user, the one before revoked (a user holds
    one at a time); ``None`` without ``token_for``."""
    bridge = spec.bridge
    if bridge is None or not bridge.enabled or bridge.token_for is None:
        return None
    name = bridge.token_for
    try:
        store = TokenStore.for_policy(policy)
        if any(r.name == name and r.revoked is None for r in store.records()):
            store.revoke(name)
        return store.issue(name)
    except TokenError as exc:
        raise click.ClickException(f"bridge.token_for: {exc}") from None


async def _supervise(
    spec: MeshSpec,
    run: RunDir,
    children: list[Child],
    key: Path,
    *,
    detached: bool,
    token: str | None = None,
) -> int:
    run.prepare([child.name for child in children])
    width = max(len(child.name) for child in children)
    bridge_url = spec.bridge.url if spec.bridge is not None and spec.bridge.enabled else None
    state = RunState(
        mesh=spec.name,
        spec=str(spec.source),
        policy=str(spec.policy),
        supervisor=Pid.of(os.getpid()),
        detached=detached,
        started=time.time(),
        bridge_url=bridge_url,
    )

    def changed() -> None:
        state.processes = [_process_state(child) for child in children]
        run.write(state)

    def output(name: str, line: str) -> None:
        click.echo(f"[{name:>{width}}] {line}", nl=False)

    supervisor = Supervisor(
        children,
        spec.restart,
        report=lambda message: click.echo(f"mesh up: {message}"),
        output=None if detached else output,
        changed=changed,
    )
    stop = asyncio.Event()

    def interrupted() -> None:
        if stop.is_set():
            click.echo("mesh up: stopping at once (SIGKILL to every process)")
            supervisor.kill()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted)
    changed()
    running = asyncio.create_task(supervisor.run(stop))
    await asyncio.wait(
        [running, asyncio.create_task(supervisor.started())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    about = f": {spec.description}" if spec.description else ""
    click.echo(f"mesh up: mesh {spec.name} running under {spec.policy}{about}")
    _echo_processes(state)
    if bridge_url is not None:
        click.echo(f"bridge: {bridge_url}")
    where = "" if detached else ", and here, prefixed with its name"
    click.echo(f"logs: {run.logs}/<name>.log{where}; Ctrl+C (or mesh down) stops the mesh")
    announcing = None
    if bridge_url is not None and token is not None:
        announcing = asyncio.create_task(_announce(bridge_url, token))
    await running
    if announcing is not None:
        announcing.cancel()
    click.echo(
        "mesh up: the gateway's audit trail verifies with: "
        f"MESH_AUDIT_KEY_FILE={key} mesh audit verify"
    )
    states = {child.name: child.state for child in children}
    unclean = [name for name, s in states.items() if s not in ("stopped", "exited", "failed")]
    if unclean:
        click.echo(f"mesh up: {', '.join(unclean)} did not stop cleanly")
        return 1
    failed = [name for name, s in states.items() if s == "failed"]
    if failed and not stop.is_set():
        click.echo(f"mesh up: every process ended; given up on: {', '.join(failed)}")
        return 1
    return 0


def _detach(spec_file: str, run: RunDir, token: str | None) -> int:
    """Start ``mesh up --supervise`` in a session of its own, its output in ``up.log``; wait
    until it started every process, then show them."""
    run.path.mkdir(parents=True, exist_ok=True)
    rotate(run.supervisor_log)
    with run.supervisor_log.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "up", spec_file, "--supervise",
             "--run-dir", str(run.path.parent)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def settled() -> bool:
        state = run.read()
        return process.poll() is not None or (
            state is not None
            and state.supervisor.pid == process.pid
            and all(p.state in _SETTLED for p in state.processes)
        )

    _wait_until(settled, time.monotonic() + DETACH_TIMEOUT)
    if process.poll() is not None:
        click.echo(run.supervisor_log.read_text(errors="replace"), nl=False)
        click.echo(f"mesh up: the detached mesh ended (exit code {process.returncode})", err=True)
        return 1
    state = run.read()
    assert state is not None
    click.echo(f"mesh up: mesh {state.mesh} running detached (mesh up pid {process.pid})")
    _echo_processes(state)
    if state.bridge_url is not None:
        click.echo(f"bridge: {state.bridge_url}")
    click.echo(
        f"logs: {run.logs}/<name>.log; mesh status, mesh logs NAME, mesh down "
        f"(--mesh {state.mesh})"
    )
    if state.bridge_url is not None and token is not None:
        url = state.bridge_url
        answers = False

        def answered() -> bool:
            nonlocal answers
            answers = _answers(url)
            return answers

        _wait_until(answered, time.monotonic() + BRIDGE_TIMEOUT)
        _echo_dashboard(url, token, answers=answers)
    return 0


# The bridge's dashboard


async def _announce(url: str, token: str) -> None:
    """Print the dashboard's URL with ``token`` once the bridge answers (or its time is up)."""
    deadline = time.monotonic() + BRIDGE_TIMEOUT
    while True:
        answers = await asyncio.to_thread(_answers, url)
        if answers or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)
    _echo_dashboard(url, token, answers=answers)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _echo_dashboard(url: str, token: str, *, answers: bool) -> None:
    if not answers:
        click.echo(f"mesh up: the bridge does not answer at {url} yet (mesh logs bridge)")
    click.echo(f"dashboard: {url}?access_token={token}")
    click.echo(f'TOKEN={token}   # for curl -H "Authorization: Bearer $TOKEN" (new at each start)')


# Showing


def _process_state(child: Child) -> ProcessState:
    return ProcessState(
        name=child.name,
        role=child.process.role,
        principal=child.process.principal,
        state=child.state,
        pid=Pid.of(child.pid) if child.pid is not None else None,
        restarts=child.restarts,
        exit_code=child.exit_code,
        since=child.since,
        log=str(child.log),
    )


def _echo_processes(state: RunState) -> None:
    rows = [["NAME", "STATE", "PID", "RESTARTS", "PRINCIPAL", "LOG"]]
    for p in state.processes:
        shown = p.state
        if p.state in ("restarting", "failed", "crashed", "killed") and p.exit_code is not None:
            shown += f" ({exit_status(p.exit_code)})"
        pid = str(p.pid.pid) if p.pid is not None and p.state == "running" else "-"
        rows.append([p.name, shown, pid, str(p.restarts), p.principal, p.log])
    echo_table([["  " + row[0], *row[1:]] for row in rows])


def _find(run_dir: Path, mesh: str | None) -> tuple[RunDir, RunState]:
    try:
        run = find_run(run_dir, mesh)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    state = run.read()
    if state is None:
        raise click.ClickException(f"{run.state_file} cannot be read")
    return run, state


def _tail(data: bytes, count: int) -> list[bytes]:
    return data.splitlines(keepends=True)[-count:] if count > 0 else []


def _wait_until(done: Callable[[], bool], deadline: float) -> None:
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)
