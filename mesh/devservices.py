"""Find or start RabbitMQ and Redis for local runs and tests.

``ensure_services()`` probes ``MESH_AMQP_URL`` and ``MESH_REDIS_URL``. Where nothing answers on this
machine it starts private ``rabbitmq-server`` / ``redis-server`` processes whose data and logs live
under ``<repo>/.mesh/`` (``MESH_DEV_DIR`` overrides), installing the Debian packages first when it
runs as root with apt-get (``MESH_DEVSERVICES_INSTALL=0`` forbids that). When it cannot, it raises
:class:`DevServicesError` saying exactly what is missing.

:class:`BrokerAdmin` drives ``rabbitmqctl`` for tests: vhosts and broker-side connection closes.

Command line: ``python -m mesh.devservices {status,start,stop,exec -- CMD ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import fcntl
import functools
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from mesh.config import ConfigError, Settings
from mesh.management import ManagementAPI, management_url

log = logging.getLogger(__name__)

RABBITMQ = "rabbitmq"
REDIS = "redis"

START_TIMEOUT = 90.0
"""Seconds a private service may take to answer (a first RabbitMQ boot takes ~5-10 s)."""
CTL_TIMEOUT = 60.0
"""Seconds one ``rabbitmqctl`` call may take."""

# Non-root PATHs on Debian lack the sbin directories where rabbitmq-server lives.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
_REDIS_PING = b"*1\r\n$4\r\nPING\r\n"
# The Debian rabbitmq wrapper re-joins arguments inside double quotes for `su -c`, so these would
# be interpreted by a shell there.
_SHELL_UNSAFE = re.compile(r'[$`"\\\n]')


class DevServicesError(RuntimeError):
    """A service is missing or unreachable; the message says what to do about it."""


class Probe(enum.Enum):
    """What answered at a service's address."""

    ANSWERS = "answers"
    NOTHING = "nothing is listening"
    OTHER = "something else is listening (it does not speak the protocol)"


@dataclass(frozen=True)
class Endpoint:
    """Where a service should answer, parsed from its URL."""

    kind: str
    url: str
    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None
    path: str

    @property
    def label(self) -> str:
        return "RabbitMQ" if self.kind == RABBITMQ else "Redis"

    @property
    def env_var(self) -> str:
        return "MESH_AMQP_URL" if self.kind == RABBITMQ else "MESH_REDIS_URL"

    @property
    def package(self) -> str:
        """The Debian package, which is also the server program's name."""
        return "rabbitmq-server" if self.kind == RABBITMQ else "redis-server"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def tls(self) -> bool:
        return self.scheme in ("amqps", "rediss")

    @property
    def vhost(self) -> str:
        """The AMQP virtual host the URL names (``/`` when it names none)."""
        return unquote(self.path[1:]) if len(self.path) > 1 else "/"

    @property
    def is_local(self) -> bool:
        """True when the host is this machine's loopback, where we may start a private server."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def bind_host(self) -> str:
        return "127.0.0.1" if self.host == "localhost" else self.host


def parse_endpoint(kind: str, url: str) -> Endpoint:
    """Split an ``amqp(s)://`` or ``redis(s)://`` URL into what probing and starting need."""
    parts = urlsplit(url)
    schemes = {RABBITMQ: ("amqp", "amqps"), REDIS: ("redis", "rediss")}[kind]
    if parts.scheme not in schemes:
        var = "MESH_AMQP_URL" if kind == RABBITMQ else "MESH_REDIS_URL"
        raise DevServicesError(
            f"{var}={url!r}: devservices understands only {' and '.join(schemes)} URLs"
        )
    default_port = {"amqp": 5672, "amqps": 5671, "redis": 6379, "rediss": 6379}[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise DevServicesError(f"bad port in {url!r}: {exc}") from None
    return Endpoint(
        kind=kind,
        url=url,
        scheme=parts.scheme,
        host=parts.hostname or "127.0.0.1",
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        path=parts.path,
    )


def with_vhost(amqp_url: str, vhost: str) -> str:
    """The same AMQP URL, naming another virtual host."""
    parts = urlsplit(amqp_url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def probe(endpoint: Endpoint, timeout: float = 2.0) -> Probe:
    """Check that the service answers its protocol (AMQP header / Redis PING), not just a port."""
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except OSError:
        return Probe.NOTHING
    with sock:
        if endpoint.tls:
            # Speaking the protocol would need a TLS handshake with the right certificates;
            # an accepting port is the best we can check here.
            return Probe.ANSWERS
        expected: tuple[bytes, ...]
        if endpoint.kind == RABBITMQ:
            # A broker answers with a Connection.Start method frame (frame type 1).
            hello, expected, need = _AMQP_HEADER, (b"\x01",), 1
        else:
            # A password-protected Redis still proves it is Redis by refusing with NOAUTH.
            hello, expected, need = _REDIS_PING, (b"+PONG", b"-NOAUTH"), 7
        data = b""
        try:
            sock.sendall(hello)
            while len(data) < need:
                chunk = sock.recv(64)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    return Probe.ANSWERS if data.startswith(expected) else Probe.OTHER


def default_state_dir() -> Path:
    """``MESH_DEV_DIR``, else ``<repo>/.mesh`` (this checkout), else ``./.mesh``."""
    configured = os.environ.get("MESH_DEV_DIR")
    if configured:
        return Path(configured).resolve()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").exists():
        return repo / ".mesh"
    return Path.cwd() / ".mesh"


def default_search_path() -> str:
    """``PATH`` plus the sbin directories, where Debian puts the server programs."""
    parts = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(parts + [d for d in _SBIN_DIRS if d not in parts])


def find_program(name: str, search_path: str, *, unwrap: bool = False) -> Path | None:
    """Locate a program; with ``unwrap``, see through Debian's rabbitmq su-wrapper.

    Debian's ``/usr/sbin/rabbitmq*`` re-run the real script as user ``rabbitmq`` with the system
    node's cookie and home, which is right for the system node and wrong for a private one.
    """
    found = shutil.which(name, path=search_path)
    if found is None:
        return None
    real = Path(found).resolve()
    if unwrap and real.name == "rabbitmq-script-wrapper" and (real.parent / name).exists():
        return real.parent / name
    return Path(found)


def _pid_alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and (where /proc tells) is the process we started, not a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _clean_env() -> dict[str, str]:
    # Inherited RABBITMQ_*/ERL_* (e.g. from a shell set up for the system node) would steer the
    # private node or the CLI towards another node.
    return {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}


@dataclass(frozen=True)
class PrivateRabbit:
    """A RabbitMQ node this module started; recorded in ``state.json`` in its directory."""

    directory: Path
    node: str
    port: int
    rabbitmqctl: str
    management_port: int | None = None

    @property
    def pidfile(self) -> Path:
        return self.directory / "rabbitmq.pid"

    @property
    def logfile(self) -> Path:
        return self.directory / "log" / f"{self.node}.log"

    def ctl_env(self) -> dict[str, str]:
        """Environment for ``rabbitmqctl``: the node's cookie (in its HOME), no system env file."""
        return {
            **_clean_env(),
            "HOME": str(self.directory / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
        }

    def running_pid(self) -> int | None:
        pid = _read_pid(self.pidfile)
        return pid if pid is not None and _pid_alive(pid, str(self.directory)) else None

    def save(self) -> None:
        state = {
            "node": self.node,
            "port": self.port,
            "rabbitmqctl": self.rabbitmqctl,
            "management_port": self.management_port,
        }
        (self.directory / "state.json").write_text(json.dumps(state))

    @classmethod
    def load(cls, directory: Path) -> PrivateRabbit | None:
        try:
            state = json.loads((directory / "state.json").read_text())
            management = state.get("management_port")
            return cls(
                directory,
                str(state["node"]),
                int(state["port"]),
                str(state["rabbitmqctl"]),
                None if management is None else int(management),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _rabbit_dir(state_dir: Path, port: int) -> Path:
    return state_dir / f"rabbitmq-{port}"


def _redis_dir(state_dir: Path, port: int) -> Path:
    return state_dir / f"redis-{port}"


def running_private_rabbit(endpoint: Endpoint, state_dir: Path) -> PrivateRabbit | None:
    """The private node serving ``endpoint``, if this module started one and it still runs."""
    if not endpoint.is_local:
        return None
    rabbit = PrivateRabbit.load(_rabbit_dir(state_dir, endpoint.port))
    return rabbit if rabbit is not None and rabbit.running_pid() is not None else None


def _private_process(endpoint: Endpoint, state_dir: Path) -> tuple[int, Path] | None:
    """(pid, directory) of the private process serving ``endpoint``, if we started one."""
    if endpoint.kind == RABBITMQ:
        rabbit = running_private_rabbit(endpoint, state_dir)
        pid = rabbit.running_pid() if rabbit else None
        return (pid, rabbit.directory) if rabbit and pid else None
    directory = _redis_dir(state_dir, endpoint.port)
    pid = _read_pid(directory / "redis.pid")
    if not endpoint.is_local or pid is None or not _pid_alive(pid, f":{endpoint.port}"):
        return None
    return pid, directory


@dataclass(frozen=True)
class ServiceStatus:
    """What answers at one service's address, and whether it is a process we started."""

    endpoint: Endpoint
    probe: Probe
    private_pid: int | None = None
    directory: Path | None = None

    def describe(self) -> str:
        where = f"{self.endpoint.label} at {self.endpoint.address} ({self.endpoint.env_var}):"
        if self.probe is not Probe.ANSWERS:
            return f"{where} {self.probe.value}"
        if self.private_pid is not None:
            return f"{where} answers; private process {self.private_pid}, data in {self.directory}"
        return f"{where} answers (not started by devservices)"


@dataclass(frozen=True)
class Services:
    """The RabbitMQ and Redis a run uses."""

    settings: Settings
    state_dir: Path
    rabbitmq: ServiceStatus
    redis: ServiceStatus

    @property
    def ok(self) -> bool:
        return self.rabbitmq.probe is Probe.ANSWERS and self.redis.probe is Probe.ANSWERS

    @property
    def private_rabbit(self) -> PrivateRabbit | None:
        return running_private_rabbit(self.rabbitmq.endpoint, self.state_dir)

    def environ(self) -> dict[str, str]:
        """Variables that point a child process at these services."""
        env = {
            "MESH_AMQP_URL": self.settings.amqp_url,
            "MESH_REDIS_URL": self.settings.redis_url,
            "MESH_DEV_DIR": str(self.state_dir),
        }
        rabbit = self.private_rabbit
        if rabbit is not None:
            env["MESH_RABBITMQ_NODE"] = rabbit.node
            if rabbit.management_port is not None:
                env["MESH_MANAGEMENT_URL"] = self.management_url
        return env

    @property
    def management_url(self) -> str:
        """Where the broker's management API answers (a private node's port is its own)."""
        rabbit = self.private_rabbit
        if rabbit is not None and rabbit.management_port is not None:
            ep = self.rabbitmq.endpoint
            user = quote(ep.username or "guest", safe="")
            password = quote(ep.password or "guest", safe="")
            return f"http://{user}:{password}@127.0.0.1:{rabbit.management_port}/"
        return management_url(self.settings)

    def admin(self) -> BrokerAdmin:
        return BrokerAdmin.for_settings(self.settings, state_dir=self.state_dir)


def find_services(settings: Settings | None = None, *, state_dir: Path | None = None) -> Services:
    """Probe both services without starting anything."""
    settings = settings or Settings.from_env()
    state_dir = state_dir or default_state_dir()

    def status(endpoint: Endpoint) -> ServiceStatus:
        found = probe(endpoint)
        private = _private_process(endpoint, state_dir) if found is Probe.ANSWERS else None
        return ServiceStatus(endpoint, found, *(private or (None, None)))

    return Services(
        settings,
        state_dir,
        status(parse_endpoint(RABBITMQ, settings.amqp_url)),
        status(parse_endpoint(REDIS, settings.redis_url)),
    )


def ensure_services(
    settings: Settings | None = None,
    *,
    state_dir: Path | None = None,
    search_path: str | None = None,
    allow_install: bool | None = None,
    timeout: float = START_TIMEOUT,
) -> Services:
    """Make RabbitMQ and Redis answer at the configured URLs, starting private ones if needed.

    ``search_path`` is where programs (servers, apt-get) are looked up; ``allow_install`` ``None``
    means "when root with apt-get, unless ``MESH_DEVSERVICES_INSTALL=0``".
    """
    settings = settings or Settings.from_env()
    state_dir = state_dir or default_state_dir()
    search_path = search_path or default_search_path()
    endpoints = [
        parse_endpoint(RABBITMQ, settings.amqp_url),
        parse_endpoint(REDIS, settings.redis_url),
    ]
    state_dir.mkdir(parents=True, exist_ok=True)
    # Two runs starting at once (two terminals, parallel CI jobs) must not race for the ports.
    with _locked(state_dir / "lock"):
        down = [ep for ep in endpoints if probe(ep) is not Probe.ANSWERS]
        if down:
            _start(down, state_dir, search_path, allow_install, timeout)
        services = find_services(settings, state_dir=state_dir)
        _ensure_management(services, search_path, time.monotonic() + timeout)
    return services


def ensure_program(
    names: Sequence[str],
    package: str,
    *,
    state_dir: Path | None = None,
    search_path: str | None = None,
    allow_install: bool | None = None,
) -> Path:
    """The first of ``names`` on the search path, installing Debian's ``package`` first when it
    is missing and installing is allowed (as for the services); else :class:`DevServicesError`
    saying how to get it.  Tests call it for the programs they drive (chromium)."""
    state_dir = state_dir or default_state_dir()
    search_path = search_path or default_search_path()

    def found() -> Path | None:
        return next((path for name in names if (path := find_program(name, search_path))), None)

    if (program := found()) is not None:
        return program
    if not _may_install(search_path, allow_install):
        raise DevServicesError(f"{names[0]} is not installed: run `sudo apt-get install {package}`")
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir / "lock"):  # one apt-get at a time; another run may have installed
        if (program := found()) is None:
            _apt_install([package], search_path)
            program = found()
    if program is None:
        raise DevServicesError(f"{package} installed, but none of {', '.join(names)} is found")
    return program


MANAGEMENT_PLUGIN = "rabbitmq_management"


def _management_answers(url: str) -> bool:
    """Whether an HTTP server answers at the management API's address (any status)."""
    base = ManagementAPI(url).base
    try:
        with urllib.request.urlopen(f"{base}/api/overview", timeout=2.0):
            return True
    except urllib.error.HTTPError:
        return True  # 401 without credentials: it answers
    except (urllib.error.URLError, OSError):
        return False


def _ensure_management(services: Services, search_path: str, deadline: float) -> None:
    """Enable the management plugin on a local broker that runs without it.

    A private node is started with it; the machine's own broker (CI's starts with plugins
    off) gets it enabled online, which keeps its queues and connections.
    """
    url = services.management_url
    if services.settings.management_url or _management_answers(url):
        return
    ep = services.rabbitmq.endpoint
    rabbit = services.private_rabbit
    if rabbit is not None and rabbit.management_port is not None:
        _wait_for_management(url, deadline)  # started with it, a moment after AMQP
        return
    if not ep.is_local or rabbit is not None:
        log.warning("RabbitMQ's management API does not answer at %s", url.rsplit("@", 1)[-1])
        return
    plugins = find_program("rabbitmq-plugins", search_path)
    if plugins is None:
        raise DevServicesError(
            "RabbitMQ's management plugin is off and rabbitmq-plugins is not installed: "
            f"enable {MANAGEMENT_PLUGIN} on the broker at {ep.address}"
        )
    node = os.environ.get("MESH_RABBITMQ_NODE")
    command = [str(plugins), *(["-n", node] if node else []), "enable", MANAGEMENT_PLUGIN]
    log.info("enabling %s on the broker at %s", MANAGEMENT_PLUGIN, ep.address)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise DevServicesError(
            f"{' '.join(command)} failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-500:]}"
        )
    _wait_for_management(url, deadline)


def _wait_for_management(url: str, deadline: float) -> None:
    while not _management_answers(url):
        if time.monotonic() > deadline:
            raise DevServicesError(
                f"{MANAGEMENT_PLUGIN} is enabled but its API does not answer at "
                f"{ManagementAPI(url).base}"
            )
        time.sleep(0.5)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _why_not_startable(ep: Endpoint) -> str | None:
    if not ep.is_local:
        return (
            f"{ep.label} is not answering at {ep.address} ({ep.env_var}), which is not this "
            f"machine: start it there, or point {ep.env_var} at a running {ep.label}"
        )
    if ep.tls:
        return (
            f"{ep.label} is not answering at {ep.address}, and devservices starts only plain "
            f"(non-TLS) servers: start it yourself or change {ep.env_var}"
        )
    if probe(ep) is Probe.OTHER:
        return (
            f"something other than {ep.label} listens at {ep.address}: stop it, or point "
            f"{ep.env_var} at another port"
        )
    return None


def _missing_message(ep: Endpoint) -> str:
    return (
        f"{ep.label} is not answering at {ep.address} and {ep.package} is not installed: "
        f"run `sudo apt-get install {ep.package}` or set {ep.env_var}"
    )


def _start(
    down: list[Endpoint],
    state_dir: Path,
    search_path: str,
    allow_install: bool | None,
    timeout: float,
) -> None:
    problems = [msg for ep in down if (msg := _why_not_startable(ep))]
    if problems:
        raise DevServicesError("\n".join(problems))

    servers = {ep.kind: find_program(ep.package, search_path, unwrap=True) for ep in down}
    missing = [ep for ep in down if servers[ep.kind] is None]
    if missing and _may_install(search_path, allow_install):
        _apt_install([ep.package for ep in missing], search_path)
        servers = {ep.kind: find_program(ep.package, search_path, unwrap=True) for ep in down}
        # The package may have started its system service despite our guard; use it if so.
        down = [ep for ep in down if probe(ep) is not Probe.ANSWERS]
        missing = [ep for ep in down if servers[ep.kind] is None]
    if missing:
        raise DevServicesError("\n".join(_missing_message(ep) for ep in missing))

    deadline = time.monotonic() + timeout
    waits: list[tuple[Endpoint, Callable[[], bool], Path]] = []
    for ep in down:
        server = servers[ep.kind]
        assert server is not None  # checked above; narrows the type
        if ep.kind == RABBITMQ:
            waits.append(_start_rabbitmq(ep, _rabbit_dir(state_dir, ep.port), server, search_path))
        else:
            waits.append(_start_redis(ep, _redis_dir(state_dir, ep.port), server))
    for ep, alive, logfile in waits:
        _wait_until_answering(ep, deadline, alive, logfile)
        log.info("private %s answers at %s", ep.label, ep.address)


def _may_install(search_path: str, allow_install: bool | None) -> bool:
    if allow_install is None:
        allow_install = os.environ.get("MESH_DEVSERVICES_INSTALL", "1") != "0"
    return (
        allow_install
        and os.geteuid() == 0
        and shutil.which("apt-get", path=search_path) is not None
    )


@contextlib.contextmanager
def _no_service_autostart() -> Iterator[None]:
    """Keep the packages' postinst from starting system services that would hold our ports.

    Debian's invoke-rc.d and deb-systemd-invoke skip starting services while policy-rc.d exits
    101. An existing policy-rc.d is someone else's choice and is left alone.
    """
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text(
        "#!/bin/sh\n# written by mesh.devservices while installing packages\nexit 101\n"
    )
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def _run_apt(cmd: list[str], env: Mapping[str, str]) -> None:
    log.info("running %s", " ".join(cmd))
    result = subprocess.run(
        cmd, env=dict(env), capture_output=True, text=True, timeout=1800, check=False
    )
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
        raise DevServicesError(f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{output}")


def _apt_env() -> dict[str, str]:
    # dpkg's maintainer scripts need the sbin directories even when the caller's PATH lacks them.
    return {**os.environ, "PATH": default_search_path(), "DEBIAN_FRONTEND": "noninteractive"}


@functools.cache
def _apt_update(apt: str) -> None:
    """``apt-get update``, once per process however many installs follow."""
    _run_apt([apt, "update"], _apt_env())


def _apt_install(packages: list[str], search_path: str) -> None:
    apt = shutil.which("apt-get", path=search_path)
    assert apt is not None  # _may_install checked it
    log.warning("installing %s with apt-get (MESH_DEVSERVICES_INSTALL=0 forbids this)", packages)
    with _no_service_autostart():
        _apt_update(apt)
        _run_apt([apt, "install", "-y", "--no-install-recommends", *packages], _apt_env())


def _free_port(preferred: int, host: str = "127.0.0.1") -> int:
    """``preferred`` if nothing holds it, else any free port."""
    for candidate in (preferred, 0):
        if not 0 <= candidate < 65536:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
            port: int = sock.getsockname()[1]
            return port
    raise DevServicesError("no free TCP port for RabbitMQ's distribution listener")


def _start_rabbitmq(
    ep: Endpoint, directory: Path, server: Path, search_path: str
) -> tuple[Endpoint, Callable[[], bool], Path]:
    ctl = find_program("rabbitmqctl", search_path, unwrap=True)
    rabbit = PrivateRabbit(
        directory=directory,
        node=f"mesh-dev-{ep.port}@localhost",
        port=ep.port,
        rabbitmqctl=str(ctl or server.parent / "rabbitmqctl"),
        management_port=_free_port(ep.port + 10000),
    )
    # A dev broker holds nothing worth keeping, and a fresh database makes the URL's user and
    # vhost (applied only at first boot) take effect.
    shutil.rmtree(directory / "mnesia", ignore_errors=True)
    for sub in ("home", "log", "mnesia"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    cookie = directory / "home" / ".erlang.cookie"
    if not cookie.exists():
        # A private cookie keeps this node apart from the system one and needs no root.
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
    # Distribution port: the usual AMQP+20000, unless the system node already holds it.
    dist_port = _free_port(ep.port + 20000)
    user = ep.username or "guest"
    config = [
        f"listeners.tcp.default = {ep.bind_host}:{ep.port}",
        "distribution.listener.interface = 127.0.0.1",
        f"distribution.listener.port_range.min = {dist_port}",
        f"distribution.listener.port_range.max = {dist_port}",
        f"default_user = {user}",
        f"default_pass = {ep.password or 'guest'}",
        f"default_vhost = {ep.vhost}",
        "default_permissions.configure = .*",
        "default_permissions.read = .*",
        "default_permissions.write = .*",
        "management.tcp.ip = 127.0.0.1",
        f"management.tcp.port = {rabbit.management_port}",
        "log.console = false",
        "log.file.level = info",
    ]
    (directory / "rabbitmq.conf").write_text("\n".join(config) + "\n")
    (directory / "enabled_plugins").write_text(f"[{MANAGEMENT_PLUGIN}].\n")
    (directory / "rabbitmq-env.conf").write_text("# private node: settings come from the env\n")
    rabbit.pidfile.unlink(missing_ok=True)
    env = {
        **rabbit.ctl_env(),
        "RABBITMQ_BASE": str(directory),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_PID_FILE": str(rabbit.pidfile),
        "RABBITMQ_NODENAME": rabbit.node,
        "RABBITMQ_NODE_IP_ADDRESS": ep.bind_host,
        "RABBITMQ_NODE_PORT": str(ep.port),
        "RABBITMQ_DIST_PORT": str(dist_port),
    }
    launcher_log = directory / "log" / "launcher.log"
    log.info("starting private RabbitMQ %s at %s, data in %s", rabbit.node, ep.address, directory)
    with launcher_log.open("w") as out:
        # -detached daemonizes the node, so it outlives this process (and its exec'd successor).
        result = subprocess.run(
            [str(server), "-detached"],
            env=env,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            timeout=60,
            check=False,
        )
    if result.returncode != 0:
        raise DevServicesError(
            f"{server} -detached failed (exit {result.returncode}):\n{_tail(launcher_log)}"
        )
    rabbit.save()

    def alive() -> bool:
        pid = _read_pid(rabbit.pidfile)
        # Until the node writes its pid file we cannot tell; the deadline covers that window.
        return pid is None or _pid_alive(pid, str(directory))

    return ep, alive, rabbit.logfile


def _start_redis(
    ep: Endpoint, directory: Path, server: Path
) -> tuple[Endpoint, Callable[[], bool], Path]:
    directory.mkdir(parents=True, exist_ok=True)
    pidfile = directory / "redis.pid"
    logfile = directory / "redis.log"
    pidfile.unlink(missing_ok=True)
    cmd = [
        str(server),
        "--port", str(ep.port),
        "--bind", ep.bind_host,
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "yes",
        "--pidfile", str(pidfile),
        "--logfile", str(logfile),
    ]  # fmt: skip
    if ep.password:
        if ep.username and ep.username != "default":
            cmd += ["--user", ep.username, "on", f">{ep.password}", "~*", "&*", "+@all"]
        else:
            cmd += ["--requirepass", ep.password]
    log.info("starting private Redis at %s, data in %s", ep.address, directory)
    result = subprocess.run(
        cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30, check=False
    )
    if result.returncode != 0:
        raise DevServicesError(
            f"{server} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
            f"{_tail(logfile)}"
        )

    def alive() -> bool:
        pid = _read_pid(pidfile)
        return pid is None or _pid_alive(pid, f":{ep.port}")

    return ep, alive, logfile


def _wait_until_answering(
    ep: Endpoint, deadline: float, alive: Callable[[], bool], logfile: Path
) -> None:
    while probe(ep, timeout=1.0) is not Probe.ANSWERS:
        if not alive():
            raise DevServicesError(
                f"private {ep.label} exited while starting; last lines of {logfile}:\n"
                f"{_tail(logfile)}"
            )
        if time.monotonic() > deadline:
            raise DevServicesError(
                f"private {ep.label} did not answer at {ep.address} in time; last lines of "
                f"{logfile}:\n{_tail(logfile)}"
            )
        time.sleep(0.2)


def _wait_gone(pid: int, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _terminate(pid: int, marker: str, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, marker, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, marker, 5.0)


def stop_services(state_dir: Path | None = None) -> list[str]:
    """Stop every private service recorded under ``state_dir``; return what was stopped."""
    state_dir = state_dir or default_state_dir()
    stopped: list[str] = []
    for directory in sorted(state_dir.glob("rabbitmq-*")):
        rabbit = PrivateRabbit.load(directory)
        if rabbit is None:
            continue
        pid = rabbit.running_pid()
        if pid is not None:
            log.info("stopping private RabbitMQ %s (pid %d)", rabbit.node, pid)
            # A clean shutdown lets RabbitMQ close client connections properly; signals are
            # the fallback when the CLI cannot reach the node.
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [rabbit.rabbitmqctl, "-n", rabbit.node, "shutdown"],
                    env=rabbit.ctl_env(),
                    capture_output=True,
                    timeout=CTL_TIMEOUT,
                    check=False,
                )
            _terminate(pid, str(directory))
            stopped.append(f"RabbitMQ {rabbit.node} on port {rabbit.port} (pid {pid})")
        (directory / "state.json").unlink(missing_ok=True)
    for directory in sorted(state_dir.glob("redis-*")):
        pidfile = directory / "redis.pid"
        pid = _read_pid(pidfile)
        port = directory.name.removeprefix("redis-")
        if pid is not None and _pid_alive(pid, f":{port}"):
            log.info("stopping private Redis on port %s (pid %d)", port, pid)
            _terminate(pid, f":{port}")
            stopped.append(f"Redis on port {port} (pid {pid})")
        pidfile.unlink(missing_ok=True)
    return stopped


@dataclass(frozen=True)
class BrokerConnection:
    """One client connection as the broker lists it."""

    vhost: str
    pid: str
    user: str
    name: str


def _check_arg(value: str) -> str:
    if _SHELL_UNSAFE.search(value):
        raise ValueError(f'{value!r}: rabbitmqctl arguments may not contain $ ` " \\ or newlines')
    return value


class BrokerAdmin:
    """Administers the broker behind an AMQP URL with ``rabbitmqctl`` (for tests and dev tools).

    Every call first checks, once, that ``rabbitmqctl`` reaches the node listening on the URL's
    port, so vhosts never land on some other local broker.
    """

    def __init__(
        self,
        amqp_url: str,
        *,
        rabbitmqctl: str = "rabbitmqctl",
        node: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = CTL_TIMEOUT,
    ) -> None:
        self.endpoint = parse_endpoint(RABBITMQ, amqp_url)
        self.rabbitmqctl = rabbitmqctl
        self.node = node
        self.timeout = timeout
        self._env = dict(env) if env is not None else None
        self._verified_node: str | None = None

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        *,
        state_dir: Path | None = None,
        environ: Mapping[str, str] | None = None,
        search_path: str | None = None,
    ) -> BrokerAdmin:
        """The admin for ``settings.amqp_url``: our private node, or the local (system) one.

        ``MESH_RABBITMQ_NODE`` names the node when ``rabbitmqctl``'s default is not the right one.
        """
        env = os.environ if environ is None else environ
        ep = parse_endpoint(RABBITMQ, settings.amqp_url)
        rabbit = running_private_rabbit(ep, state_dir or default_state_dir())
        if rabbit is not None:
            return cls(
                settings.amqp_url,
                rabbitmqctl=rabbit.rabbitmqctl,
                node=rabbit.node,
                env=rabbit.ctl_env(),
            )
        node = env.get("MESH_RABBITMQ_NODE") or None
        if not ep.is_local and node is None:
            raise DevServicesError(
                f"RabbitMQ at {ep.address} is not on this machine, so rabbitmqctl cannot "
                "administer it: run the tests against a local broker, or set MESH_RABBITMQ_NODE "
                "to its Erlang node name (with the node's cookie in ~/.erlang.cookie)"
            )
        ctl = find_program("rabbitmqctl", search_path or default_search_path())
        if ctl is None:
            raise DevServicesError(
                "rabbitmqctl is not installed, and the tests need it to create vhosts: run "
                "`sudo apt-get install rabbitmq-server`"
            )
        return cls(settings.amqp_url, rabbitmqctl=str(ctl), node=node)

    async def ctl(self, *args: str, stdin: bytes | None = None) -> str:
        """Run ``rabbitmqctl [-n node] ARGS`` against the verified node; return its stdout."""
        await self.node_name()
        return await self._run(*args, stdin=stdin)

    async def _run(self, *args: str, stdin: bytes | None = None) -> str:
        cmd = [self.rabbitmqctl, *(["-n", self.node] if self.node else []), *map(_check_arg, args)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
            )
        except OSError as exc:
            raise DevServicesError(f"cannot run {self.rabbitmqctl}: {exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DevServicesError(
                f"rabbitmqctl {' '.join(args)} took more than {self.timeout:.0f}s"
            ) from None
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if proc.returncode != 0:
            raise self._error(args, proc.returncode, (stderr + stdout).strip())
        return stdout

    def _error(self, args: Sequence[str], code: int | None, text: str) -> DevServicesError:
        if "unable to perform an operation on node" in text or "nodedown" in text:
            return DevServicesError(
                f"rabbitmqctl cannot reach RabbitMQ node {self.node or '(its default node)'}: "
                f"the broker at {self.endpoint.address} must run on this machine and this user "
                "must share its Erlang cookie (a remote broker cannot be administered this "
                f"way).\n{text}"
            )
        return DevServicesError(f"rabbitmqctl {' '.join(args)} failed (exit {code}): {text}")

    async def node_name(self) -> str:
        """The node that serves the URL's AMQP port (checked once per admin)."""
        if self._verified_node is None:
            status = json.loads(await self._run("-q", "status", "--formatter", "json"))
            listeners = status.get("listeners", [])
            amqp_ports = {
                int(lis["port"]) for lis in listeners if str(lis.get("protocol")).startswith("amqp")
            }
            node = next((str(lis["node"]) for lis in listeners), self.node or "?")
            if self.endpoint.port not in amqp_ports:
                raise DevServicesError(
                    f"rabbitmqctl reaches node {node}, which serves AMQP on ports "
                    f"{sorted(amqp_ports)}, not on {self.endpoint.port} from MESH_AMQP_URL: "
                    "set MESH_RABBITMQ_NODE to the node behind that port"
                )
            self._verified_node = node
        return self._verified_node

    async def list_vhosts(self) -> list[str]:
        return (await self.ctl("-s", "list_vhosts", "name")).splitlines()

    async def create_vhost(self, name: str) -> None:
        """Create a vhost (or keep an existing one); the URL's user gets full permissions."""
        user = self.endpoint.username or "guest"
        definitions = {
            "vhosts": [{"name": _check_arg(name)}],
            "permissions": [
                {"user": user, "vhost": name, "configure": ".*", "write": ".*", "read": ".*"}
            ],
        }
        # One definitions import (read from stdin) instead of add_vhost + set_permissions:
        # each rabbitmqctl call boots an Erlang VM, and tests create a vhost per test.
        await self.ctl(
            "-q", "import_definitions", "--format", "json", stdin=json.dumps(definitions).encode()
        )

    async def delete_vhost(self, name: str) -> None:
        """Delete a vhost (closing its connections); a vhost that does not exist is fine."""
        try:
            await self.ctl("-q", "delete_vhost", name)
        except DevServicesError as exc:
            if "does not exist" not in str(exc):
                raise

    async def list_connections(self, vhost: str) -> list[BrokerConnection]:
        """The client connections open on ``vhost``."""
        out = await self.ctl("-s", "list_connections", "vhost", "pid", "user", "name")
        rows = [line.split("\t", 3) for line in out.splitlines() if line.strip()]
        return [BrokerConnection(*row) for row in rows if len(row) == 4 and row[0] == vhost]

    async def close_connections(self, vhost: str, reason: str = "closed by test") -> None:
        """Close every client connection of ``vhost`` from the broker side."""
        await self.ctl("-q", "close_all_connections", "--vhost", vhost, _safe_reason(reason))


def _safe_reason(reason: str) -> str:
    return _SHELL_UNSAFE.sub(" ", reason)


# --- command line ------------------------------------------------------------------------------


def _say(text: str, *, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout)


def _report(services: Services) -> None:
    _say(services.rabbitmq.describe())
    _say(services.redis.describe())


def _cmd_status() -> int:
    services = find_services()
    _report(services)
    if services.rabbitmq.probe is Probe.ANSWERS:
        try:
            node = asyncio.run(services.admin().node_name())
            _say(f"rabbitmqctl administers node {node}")
        except DevServicesError as exc:
            _say(f"rabbitmqctl: {exc}")
    return 0 if services.ok else 1


def _cmd_exec(command: list[str]) -> int:
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        _say("devservices exec: give a command, e.g. `exec -- pytest -q`", err=True)
        return 2
    services = ensure_services()
    os.environ.update(services.environ())
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        _say(f"devservices exec: cannot run {command[0]}: {exc.strerror}", err=True)
        return 127
    return 0  # not reached: execvp replaces this process


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.devservices",
        description="Find or start RabbitMQ and Redis for local runs and tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="show what answers at MESH_AMQP_URL / MESH_REDIS_URL")
    sub.add_parser("start", help="start private services where nothing answers")
    sub.add_parser("stop", help="stop the private services started under .mesh/")
    run = sub.add_parser("exec", help="ensure services, export their URLs, and exec a command")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="devservices: %(message)s")
    try:
        if args.command == "status":
            return _cmd_status()
        if args.command == "start":
            _report(ensure_services())
            return 0
        if args.command == "stop":
            stopped = stop_services()
            _say("\n".join(f"stopped {s}" for s in stopped) or "no private services running")
            return 0
        return _cmd_exec(list(args.cmd))
    except (DevServicesError, ConfigError) as exc:
        _say(f"devservices: {exc}", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
