"""The audit keys: the one records are sealed with now, and older ones by id for verifying.

A key is a secret string of 32 characters or more (``openssl rand -hex 32``), from
``MESH_AUDIT_KEY`` or the file ``MESH_AUDIT_KEY_FILE`` names, with the id
``MESH_AUDIT_KEY_ID``.  Each record names the id of the key that sealed it, so a rotation is a
new key under a new id; the old one moves to ``MESH_AUDIT_KEYS_FILE`` (lines ``<id> <key>``,
``#`` comments) for as long as records sealed with it are kept.  Keys never reach Redis, and
this class never shows them (its repr lists ids only).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from mesh.config import ConfigError, Settings

MIN_KEY_LENGTH = 32
KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class AuditKeys:
    """Keys by id; ``current_id`` names the one new records are sealed with (if any)."""

    __slots__ = ("_keys", "current_id")

    def __init__(self, keys: Mapping[str, str | bytes], current_id: str | None = None) -> None:
        self._keys = {check_key_id(kid): _key_bytes(kid, key) for kid, key in keys.items()}
        if current_id is not None and current_id not in self._keys:
            raise ConfigError(f"audit key id {current_id!r} has no key")
        self.current_id = current_id

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditKeys:
        """The keys ``MESH_AUDIT_KEY`` (or ``…_KEY_FILE``) and ``MESH_AUDIT_KEYS_FILE`` give.

        Raises ``ConfigError`` naming the setting when none is given or one is unusable.
        """
        keys: dict[str, str] = {}
        if settings.audit_keys_file:
            keys.update(_read_keys_file(Path(settings.audit_keys_file)))
        current = _current_key(settings)
        current_id = None
        if current is not None:
            current_id = settings.audit_key_id
            if keys.get(current_id, current) != current:
                raise ConfigError(
                    f"MESH_AUDIT_KEYS_FILE holds another key under the current id {current_id!r} "
                    "(MESH_AUDIT_KEY_ID): give each key an id of its own"
                )
            keys[current_id] = current
        if not keys:
            raise ConfigError(
                "no audit key: set MESH_AUDIT_KEY (or MESH_AUDIT_KEY_FILE), "
                "e.g. MESH_AUDIT_KEY=$(openssl rand -hex 32)"
            )
        return cls(keys, current_id)

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    @property
    def current(self) -> bytes:
        """The key new records are sealed with."""
        if self.current_id is None:
            raise ConfigError("no current audit key: set MESH_AUDIT_KEY (or MESH_AUDIT_KEY_FILE)")
        return self._keys[self.current_id]

    def get(self, key_id: str) -> bytes | None:
        return self._keys.get(key_id)

    def __repr__(self) -> str:
        return f"<AuditKeys ids={self.ids} current={self.current_id!r}>"


def check_key_id(key_id: str) -> str:
    if not KEY_ID.match(key_id):
        raise ConfigError(f"audit key id {key_id!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return key_id


def _key_bytes(key_id: str, key: str | bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    if len(raw) < MIN_KEY_LENGTH:
        # The length only: the message must not show any part of a secret.
        raise ConfigError(
            f"audit key {key_id!r} is {len(raw)} characters; use {MIN_KEY_LENGTH} or more "
            "(openssl rand -hex 32)"
        )
    return raw


def _current_key(settings: Settings) -> str | None:
    if settings.audit_key is not None and settings.audit_key_file:
        raise ConfigError("set MESH_AUDIT_KEY or MESH_AUDIT_KEY_FILE, not both")
    if settings.audit_key is not None:
        return settings.audit_key.get_secret_value()
    if settings.audit_key_file:
        path = Path(settings.audit_key_file)
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read MESH_AUDIT_KEY_FILE {path}: {exc.strerror}") from None
    return None


def _read_keys_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read MESH_AUDIT_KEYS_FILE {path}: {exc.strerror}") from None
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, _, key = line.partition(" ")
        key = key.strip()
        if not key or not KEY_ID.match(key_id):
            raise ConfigError(f"MESH_AUDIT_KEYS_FILE {path}:{number}: expected '<id> <key>'")
        if key_id in keys:
            raise ConfigError(f"MESH_AUDIT_KEYS_FILE {path}:{number}: key id {key_id!r} again")
        keys[key_id] = key
    return keys
