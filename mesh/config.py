"""Settings, read from the environment and optionally a YAML file."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

ENV_PREFIX = "MESH_"

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The settings are invalid; the message names the offending setting."""


class Settings(BaseModel):
    """Everything an agent process needs to reach the mesh.

    Each field is read from ``MESH_<FIELD>`` (``MESH_AMQP_URL``, ``MESH_REDIS_URL`` …);
    ``MESH_CONFIG`` may name a YAML file whose keys are the field names.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    amqp_url: str = DEFAULT_AMQP_URL
    redis_url: str = DEFAULT_REDIS_URL
    policy: str | None = None
    """The policy file (``policy.yaml``) the gateway enforces; none: open mode, where every
    sender is trusted (first steps only)."""
    management_url: str | None = None
    """RabbitMQ's management API (``mesh queues``, ``mesh forget``); by default the AMQP
    URL's host and user on port 15672."""
    namespace: str = Field(default="mesh", pattern=r"^[A-Za-z0-9_.:-]+$")
    prefetch: int = Field(default=100, ge=1, le=65535)
    max_deliveries: int = Field(default=5, ge=1)
    """Handler attempts before a message is dead-lettered (a behaviour may say otherwise)."""
    retry_delays: tuple[float, ...] = (1.0, 5.0, 30.0)
    """Seconds before attempt 2, 3, …; the last repeats (``MESH_RETRY_DELAYS=1,5,30``)."""
    broadcast_queue_expires: float = Field(default=900.0, ge=1)
    """Seconds a broadcast behaviour's queue outlives its departed instance."""
    request_queue_expires: float = Field(default=300.0, ge=1)
    """Seconds an agent's ``@rpc`` queue outlives the last instance consuming it."""
    max_queue_length: int = Field(default=100_000, ge=1)
    """Messages a behaviour queue holds before its oldest are dropped (and dead-lettered)."""
    migrate_queues: bool = False
    """Move the messages of a queue an earlier version declared otherwise into a new one."""
    idempotency_window: float = Field(default=86_400.0, ge=1)
    """Seconds an ``idempotent`` behaviour remembers the ids it handled."""
    dead_letter_max_bytes: int = Field(default=1_000_000_000, ge=1_000_000)
    """Size ``mesh.dead`` keeps; the oldest dead letters go first."""
    dead_letter_max_age: str = Field(default="7D", pattern=r"^[0-9]+[YMDhms]$")
    """Age after which dead letters go (RabbitMQ's ``x-max-age``: ``7D``, ``12h`` …)."""
    connect_timeout: float = Field(default=30.0, ge=0)
    """Seconds a starting agent keeps trying to reach RabbitMQ before it gives up."""
    publish_timeout: float = Field(default=30.0, gt=0)
    request_timeout: float = Field(default=5.0, gt=0)
    heartbeat_interval: float = Field(default=2.0, gt=0)
    heartbeat_ttl: float = Field(default=10.0, gt=0)
    shutdown_timeout: float = Field(default=30.0, gt=0)
    """Seconds a stopping agent (SIGTERM) lets its handlers finish what is in flight."""
    health_port: int | None = Field(default=None, ge=0, le=65535)
    """The port of ``/healthz``, ``/readyz`` and ``/metrics`` in ``mesh run`` and ``mesh
    gateway`` processes; none: no such port (0: any free one, logged)."""
    health_host: str = "0.0.0.0"
    """The address the health port listens on (every interface, for Kubernetes' probes)."""
    tls_ca_file: str | None = None
    """The CA certificate (PEM) that verifies RabbitMQ and Redis over ``amqps://`` /
    ``rediss://``; none: the system's trust store."""
    tls_cert_file: str | None = None
    """This process's client certificate (PEM) for ``amqps://`` and ``rediss://``."""
    tls_key_file: str | None = None
    """The client certificate's private key (PEM); none: it is in ``tls_cert_file``."""
    audit_key: SecretStr | None = None
    """The gateway's audit-trail secret (the HMAC-SHA256 key, 32 characters or more); never
    stored in Redis nor logged.  Or ``audit_key_file``."""
    audit_key_file: str | None = None
    """A file holding the audit key (a mounted Kubernetes secret, say)."""
    audit_key_id: str = Field(default="k1", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """The audit key's id, written in every audit record: a new id for each rotation."""
    audit_keys_file: str | None = None
    """Older audit keys, to verify records written before a rotation: lines ``<id> <key>``."""
    audit_checkpoint_interval: float = Field(default=60.0, gt=0)
    """Seconds between a gateway's signed checkpoints of every audit chain's newest record."""

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: str) -> str:
        return _check_scheme(value, ("amqp", "amqps"))

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        return _check_scheme(value, ("redis", "rediss", "unix"))

    @field_validator("management_url")
    @classmethod
    def _management_scheme(cls, value: str | None) -> str | None:
        return None if value is None else _check_scheme(value, ("http", "https"))

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _split_delays(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("retry_delays")
    @classmethod
    def _positive_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(delay < 0.001 for delay in value):
            raise ValueError("give one or more delays, each at least 0.001 seconds")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``MESH_CONFIG`` (YAML), then ``MESH_*`` variables, then ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        config_file = env.get(ENV_PREFIX + "CONFIG")
        if config_file:
            values.update(_read_yaml(Path(config_file)))
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        _warn_misspelt(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX}{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"invalid mesh settings: {problems}") from None


def _check_scheme(url: str, schemes: tuple[str, ...]) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in schemes:
        raise ValueError(
            f"URL scheme {scheme or '(none)'!r} is not one of {', '.join(schemes)} "
            f"(write it as {schemes[0]}://host:port/…)"
        )
    return url


def _warn_misspelt(env: Mapping[str, str]) -> None:
    """Warn about a ``MESH_*`` variable that is almost a setting's name (a typo).

    Only near misses: other ``MESH_*`` variables (Kubernetes service links such as
    ``MESH_BRIDGE_SERVICE_HOST``, tooling of one's own) are none of the mesh's business.
    """
    known = [ENV_PREFIX + name.upper() for name in Settings.model_fields] + [
        ENV_PREFIX + "CONFIG"
    ]
    for variable in env:
        if not variable.startswith(ENV_PREFIX) or variable in known:
            continue
        close = difflib.get_close_matches(variable, known, n=1, cutoff=0.85)
        if close:
            logger.warning("%s is not a mesh setting; did you mean %s?", variable, close[0])


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read MESH_CONFIG file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"MESH_CONFIG file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"MESH_CONFIG file {path} must hold a mapping of settings")
    return data
