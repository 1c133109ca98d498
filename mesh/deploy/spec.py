"""The mesh spec, ``mesh.yaml``: the agents, gateway and bridge one mesh runs, and its policy.

``mesh up mesh.yaml`` runs it on one machine; the Kubernetes renderer reads the same model.
``load_spec`` checks the file and reports every problem as ``file:line: path: reason``.
"""

from __future__ import annotations

import difflib
import os.path
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mesh.config import ENV_PREFIX, Settings
from mesh.deploy.errors import SpecError
from mesh.filespec import BadKey, Name, Spec, one_of
from mesh.yamlfile import Location, YamlError, explain, line_of, read_yaml

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)

RESERVED_SETTINGS = {
    "amqp_url": "set from the principal's credentials",
    "redis_url": "set from the principal's credentials",
    "namespace": "set from the principal's credentials",
    "policy": "the spec's policy",
    "audit_key": "a secret: give audit_key_file",
}
"""Settings a spec may not give a process, and why."""
_SETTABLE = [name for name in Settings.model_fields if name not in RESERVED_SETTINGS]

_CLASS = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$", re.ASCII)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CPU = re.compile(r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$")
_MEMORY = re.compile(r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_MEMORY_UNITS: dict[str, int] = {
    **{unit: 1024**i for i, unit in enumerate(("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{unit: 1000**i for i, unit in enumerate(("k", "M", "G", "T", "P", "E"), 1)},
}


def _check_settings(value: dict[str, Any]) -> dict[str, Any]:
    for key, item in value.items():
        if key in RESERVED_SETTINGS:
            raise BadKey(key, f"setting {key!r} is {RESERVED_SETTINGS[key]}")
        if key not in Settings.model_fields:
            close = difflib.get_close_matches(key, _SETTABLE, n=1)
            hint = f"did you mean {close[0]}?" if close else "see mesh.config.Settings"
            raise BadKey(key, f"unknown setting {key!r} ({hint})")
        try:
            Settings.model_validate({key: item})
        except ValidationError as exc:
            raise BadKey(key, f"{exc.errors()[0]['msg']}, got {item!r}") from None
    return value


def _check_env(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not _ENV_NAME.match(key):
            raise BadKey(key, f"{key!r} is no environment variable name")
        setting = key.removeprefix(ENV_PREFIX).lower()
        if key.startswith(ENV_PREFIX) and setting in Settings.model_fields:
            raise BadKey(key, f"{key} is a mesh setting: give it as settings: {{{setting}: …}}")
    return value


def _quantity(value: object) -> object:
    # Kubernetes takes 1 and 0.5 as well as "500m"; the file may too.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _cpu(value: str) -> str:
    if not _CPU.match(value) or cpu_cores(value) <= 0:
        raise ValueError(f"cpu {value!r} is no CPU quantity (such as 250m, 0.5 or 2)")
    return value


def _memory(value: str) -> str:
    if not _MEMORY.match(value) or memory_bytes(value) <= 0:
        raise ValueError(f"memory {value!r} is no memory quantity (such as 128Mi or 1Gi)")
    return value


def cpu_cores(quantity: str) -> float:
    """``"250m"`` → 0.25."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory_bytes(quantity: str) -> float:
    """``"128Mi"`` → 134217728."""
    match = _MEMORY.match(quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is no memory quantity")
    return float(match[1]) * _MEMORY_UNITS[match[3] or ""]


SettingValues = Annotated[dict[str, Any], AfterValidator(_check_settings)]
Env = Annotated[dict[str, str], AfterValidator(_check_env)]
Cpu = Annotated[str, BeforeValidator(_quantity), AfterValidator(_cpu)]
Memory = Annotated[str, BeforeValidator(_quantity), AfterValidator(_memory)]


class Quantities(Spec):
    """CPU (cores: ``250m``, ``0.5``) and memory (bytes: ``128Mi``), as Kubernetes writes them."""

    cpu: Cpu | None = None
    memory: Memory | None = None


class ResourcesSpec(Spec):
    """What a process needs (``requests``) and may use at most (``limits``): a pod's
    resources.  ``mesh up`` does not enforce them."""

    requests: Quantities = Quantities()
    limits: Quantities = Quantities()

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> ResourcesSpec:
        cpu = (self.requests.cpu, self.limits.cpu)
        memory = (self.requests.memory, self.limits.memory)
        if cpu[0] and cpu[1] and cpu_cores(cpu[0]) > cpu_cores(cpu[1]):
            raise ValueError(f"requests.cpu {cpu[0]} is more than limits.cpu {cpu[1]}")
        if memory[0] and memory[1] and memory_bytes(memory[0]) > memory_bytes(memory[1]):
            raise ValueError(f"requests.memory {memory[0]} is more than limits.memory {memory[1]}")
        return self


class ProcessSpec(Spec):
    """What every kind of process takes: mesh settings (``MESH_<SETTING>``), further
    environment variables, resources, and its log level (default: the spec's)."""

    settings: SettingValues = {}
    env: Env = {}
    resources: ResourcesSpec = ResourcesSpec()
    log_level: LogLevel | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: object) -> object:
        return one_of("log level", value, LOG_LEVELS)

    def setting_variables(self) -> dict[str, str]:
        """``settings`` as the ``MESH_*`` variables a process reads them from."""
        return {
            ENV_PREFIX + key.upper(): _as_variable(value)
            for key, value in self.settings.items()
            if value is not None
        }


class AgentSpec(ProcessSpec):
    """An agent: its class, its id (shared by its replicas) and how many replicas run."""

    id: Name
    class_: str = Field(alias="class")
    """``module:Class``, imported by ``mesh run`` (relative to the working directory too)."""
    replicas: int = 1

    @field_validator("class_")
    @classmethod
    def _class(cls, value: str) -> str:
        if not _CLASS.match(value):
            raise ValueError(f"class {value!r} is not of the form module:Class")
        return value

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"replicas {value} must be 0 or more")
        return value


class GatewaySpec(ProcessSpec):
    """The gateway: its agent id and replicas (at least one: nothing passes without it)."""

    id: Name = "gateway"
    replicas: int = 1

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"replicas {value} must be 1 or more: every message passes a gateway")
        return value


class BridgeSpec(ProcessSpec):
    """The bridge (REST, websocket, the dashboard): on or off, where it listens."""

    enabled: bool = True
    id: Name = "bridge"
    host: str = "127.0.0.1"
    port: int = 8080
    token_for: Name | None = None
    """A user (principal of kind user) whose token ``mesh up`` replaces at each start and
    prints with the dashboard's URL.  For demos: the token is shown on the console."""

    @field_validator("port")
    @classmethod
    def _port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError(f"port {value} is not between 1 and 65535")
        return value

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"


class RestartSpec(Spec):
    """How ``mesh up`` restarts a crashed process: after ``backoff`` seconds, doubling up to
    ``max_backoff``; it gives up after ``give_up_after`` crashes in a row, each within
    ``healthy_after`` seconds of its start (a process that ran longer starts the count anew)."""

    backoff: float = 1.0
    max_backoff: float = 30.0
    give_up_after: int = 5
    healthy_after: float = 30.0

    @field_validator("backoff", "max_backoff", "give_up_after", "healthy_after")
    @classmethod
    def _positive(cls, value: float, info: ValidationInfo) -> float:
        if value <= 0:
            raise ValueError(f"{info.field_name} {value:g} must be more than 0")
        return value


class MeshSpec(Spec):
    """One mesh: its name, policy, gateway, bridge, agents, and ``mesh up``'s restarts."""

    name: Name
    """Default: the name of the directory holding the spec."""
    description: str = ""
    policy: Path
    """The policy file, relative to the spec (read as the path from the working directory)."""
    log_level: LogLevel = "info"
    gateway: GatewaySpec = GatewaySpec()
    bridge: BridgeSpec | None = None
    agents: list[AgentSpec] = []
    restart: RestartSpec = RestartSpec()

    _source: Path = PrivateAttr(default=Path("mesh.yaml"))
    _lines: dict[Location, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and "name" not in data and info.context:
            return {**data, "name": _spec_path(info).resolve().parent.name}
        return data

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: object) -> object:
        return one_of("log level", value, LOG_LEVELS)

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str) or not info.context:
            return value
        path = Path(_normalise(_spec_path(info).parent / value))
        if not path.is_file():
            raise ValueError(f"no policy file {value!r} (looked for {path})")
        return path

    def duplicates(self) -> list[tuple[Location, str]]:
        """Ids given twice (agents, the gateway, the bridge), where they were given again."""
        first: dict[str, str] = {self.gateway.id: "the gateway's"}
        out: list[tuple[Location, str]] = []
        if self.bridge is not None:
            if self.bridge.id in first:
                out.append((("bridge", "id"), f"id {self.bridge.id!r} is the gateway's too"))
            first.setdefault(self.bridge.id, "the bridge's")
        for i, agent in enumerate(self.agents):
            if agent.id in first:
                out.append((("agents", i, "id"), f"id {agent.id!r} is {first[agent.id]} too"))
            first.setdefault(agent.id, f"agents[{i}]'s")
        return out

    @property
    def source(self) -> Path:
        """The file the spec was read from."""
        return self._source

    @property
    def bridge_on(self) -> bool:
        return self.bridge is not None and self.bridge.enabled

    def error(self, path: Location, message: str) -> SpecError:
        """A problem found after loading (against the policy), at its line in the file."""
        return SpecError([(path, message, line_of(path, self._lines))], str(self._source))


def load_spec(path: str | Path) -> MeshSpec:
    """Read and check the mesh spec at ``path``.

    Raises ``SpecError`` listing every problem as ``file:line: path: reason``, and
    ``OSError`` when the file cannot be read.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([((), f"not UTF-8 text: {exc.reason}", None)], source) from None
    try:
        data, lines = read_yaml(text)
    except YamlError as exc:
        raise SpecError(exc.problems, source) from None
    if not isinstance(data, dict):
        keys = ", ".join(MeshSpec.model_fields)
        raise SpecError([((), f"a mesh spec is a mapping of {keys}, not {data!r}", 1)], source)
    try:
        spec = MeshSpec.model_validate(data, context={"spec": path})
    except ValidationError as exc:
        problems = [explain(error, lambda _: "") for error in exc.errors()]
        raise SpecError(
            [(where, message, line_of(where, lines)) for where, message in problems], source
        ) from None
    spec._source, spec._lines = path, lines
    duplicates = spec.duplicates()
    if duplicates:
        raise SpecError(
            [(where, message, line_of(where, lines)) for where, message in duplicates], source
        )
    return spec


def _spec_path(info: ValidationInfo) -> Path:
    assert info.context is not None
    spec: Path = info.context["spec"]
    return spec


def _normalise(path: Path) -> str:
    # examples/demo/../policy.yaml → examples/policy.yaml, without resolving symlinks or
    # making a relative path absolute.
    return os.path.normpath(path)


def _as_variable(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)
