"""What a running ``mesh up`` keeps on disk, in ``.mesh/up/<mesh>/``: its state (the
supervisor's pid, each process's state and pid) and a log file per process, for
``mesh status``, ``mesh logs`` and ``mesh down``, from any terminal."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from mesh.provision.credentials import write_private

DEFAULT_BASE = Path(".mesh/up")


class Pid(BaseModel):
    """A process id and the process's start time: a pid alone may have been reused since."""

    pid: int
    start: int | None = None
    """Clock ticks since boot at which it started (Linux's /proc), ``None`` elsewhere."""

    @classmethod
    def of(cls, pid: int) -> Pid:
        return cls(pid=pid, start=_start_time(pid))

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # somebody else's: alive, though not ours unless the start time matches
        return self.start is None or _start_time(self.pid) == self.start


class ProcessState(BaseModel):
    """One process as its supervisor last saw it."""

    name: str
    role: str
    principal: str
    state: str
    """``running``, ``restarting``, ``failed`` (given up on), ``exited`` (0 on its own),
    ``stopping``, ``stopped``, or ``killed`` (did not stop in time)."""
    pid: Pid | None = None
    restarts: int = 0
    exit_code: int | None = None
    since: float
    log: str


class RunState(BaseModel):
    """A ``mesh up`` run: its mesh, its supervisor, its processes."""

    mesh: str
    spec: str
    policy: str
    supervisor: Pid
    detached: bool
    started: float
    bridge_url: str | None = None
    processes: list[ProcessState] = []


class RunDir:
    """``<base>/<mesh>/``: ``state.json``, ``up.log`` (a detached supervisor's own output) and
    ``logs/<process>.log``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def supervisor_log(self) -> Path:
        return self.path / "up.log"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def log(self, process: str) -> Path:
        return self.logs / f"{process}.log"

    def prepare(self, names: Iterable[str]) -> None:
        """Make the directories; the previous run's log of each process is kept as
        ``<name>.log.1``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in names:
            rotate(self.log(name))

    def write(self, state: RunState) -> None:
        # Written whole, or not at all: a reader never sees half a file.
        write_private(self.state_file, state.model_dump_json(indent=2) + "\n")

    def read(self) -> RunState | None:
        """The last state written, ``None`` when there is none (or it cannot be read)."""
        try:
            return RunState.model_validate_json(self.state_file.read_bytes())
        except (OSError, ValidationError):
            return None

    def running(self) -> RunState | None:
        """The state, while its supervisor is alive."""
        state = self.read()
        return state if state is not None and state.supervisor.alive() else None


def run_dirs(base: Path) -> list[RunDir]:
    """The meshes ``mesh up`` ran under ``base`` (running or not)."""
    if not base.is_dir():
        return []
    return sorted(
        (RunDir(path) for path in base.iterdir() if (path / "state.json").is_file()),
        key=lambda run: run.name,
    )


def find_run(base: Path, mesh: str | None) -> RunDir:
    """The run of ``mesh``, else the only one running under ``base`` (else the only one).

    Raises ``LookupError`` saying what there is.
    """
    runs = run_dirs(base)
    if mesh is not None:
        for run in runs:
            if run.name == mesh:
                return run
        known = ", ".join(run.name for run in runs) or "none"
        raise LookupError(f"no mesh {mesh!r} under {base} (meshes there: {known})")
    running = [run for run in runs if run.running() is not None]
    candidates = running or runs
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise LookupError(f"no mesh under {base}: `mesh up SPEC --detach` starts one")
    names = ", ".join(run.name for run in candidates)
    raise LookupError(f"several meshes under {base} ({names}): name one with --mesh")


def rotate(path: Path) -> None:
    """Keep ``path`` as ``<path>.1`` (replacing the one before), so a new one starts empty."""
    if path.exists():
        path.replace(path.with_name(path.name + ".1"))


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after it.
    return int(stat.rpartition(")")[2].split()[19])
