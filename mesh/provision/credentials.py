"""Where provisioned users' passwords are kept: one env file per principal, mode 0600.

``<principal>.env`` holds ``MESH_AMQP_URL`` with the user's password, ``MESH_REDIS_URL`` with
its Redis user (the same name and password), and ``MESH_NAMESPACE``: what an agent of that
principal needs (``docker run --env-file``, or ``set -a; . ./v.env``
in a shell).  A password is generated once and kept: rerunning ``mesh provision`` reads it
back, so running agents keep working.  The deployment turns these files into Kubernetes
Secrets.  The directory (mode 0700) ignores itself in git.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from mesh.provision.errors import ProvisionError

ENV_VARIABLE = "MESH_CREDENTIALS_DIR"
DEFAULT_DIRECTORY = ".mesh-credentials"
"""Beside the policy file, unless ``--credentials`` or ``MESH_CREDENTIALS_DIR`` says."""
_SUFFIX = ".env"


def credentials_dir(
    policy_file: str | Path,
    given: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """``given``, else ``$MESH_CREDENTIALS_DIR``, else ``.mesh-credentials`` beside the policy."""
    env = os.environ if environ is None else environ
    chosen = given or env.get(ENV_VARIABLE)
    return Path(chosen) if chosen else Path(policy_file).parent / DEFAULT_DIRECTORY


def url_as(url: str, user: str, password: str) -> str:
    """``url`` (scheme, host, port, path, options) with ``user`` and ``password`` in it."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


@dataclass(frozen=True)
class Credentials:
    """One principal's broker user and password, and the settings an agent needs with them."""

    principal: str
    user: str
    password: str
    amqp_url: str
    """The URL the provisioning ran with; its credentials are replaced by this user's."""
    namespace: str
    redis_url: str | None = None
    """Likewise for Redis; ``None`` when provisioning left Redis alone."""

    def env(self) -> str:
        """The env file's text."""
        lines = [
            f"# Broker and Redis user {self.user} of principal {self.principal}, written by "
            "`mesh provision`: keep it secret.",
            f"MESH_AMQP_URL={url_as(self.amqp_url, self.user, self.password)}",
        ]
        if self.redis_url is not None:
            lines.append(f"MESH_REDIS_URL={url_as(self.redis_url, self.user, self.password)}")
        lines.append(f"MESH_NAMESPACE={self.namespace}")
        return "\n".join(lines) + "\n"


class CredentialStore:
    """The credentials directory: one ``<principal>.env`` per provisioned principal."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, principal: str) -> Path:
        return self.directory / f"{principal}{_SUFFIX}"

    def principals(self) -> list[str]:
        """The principals with a file here."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name.removesuffix(_SUFFIX) for p in self.directory.glob(f"*{_SUFFIX}"))

    def text(self, principal: str) -> str | None:
        """The file's text, ``None`` when there is none."""
        try:
            return self.path(principal).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def variables(self, principal: str) -> dict[str, str] | None:
        """The variables the file sets (``MESH_AMQP_URL``, ``MESH_NAMESPACE``); ``None`` when
        there is no file."""
        text = self.text(principal)
        if text is None:
            return None
        return dict(
            line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
        )

    def read(self, principal: str) -> tuple[str, str] | None:
        """The password and namespace the file holds; ``None`` when there is no file.

        Raises ``ProvisionError`` for a file that lacks them: a new password would lock
        out whoever uses the old one, so that is the operator's call (delete the file).
        """
        values = self.variables(principal)
        if values is None:
            return None
        password = urlsplit(values.get("MESH_AMQP_URL", "")).password
        namespace = values.get("MESH_NAMESPACE")
        if not password or not namespace:
            raise ProvisionError(
                f"{self.path(principal)} holds no MESH_AMQP_URL with a password or no "
                "MESH_NAMESPACE: delete it to have a new password generated"
            )
        return unquote(password), namespace

    def save(self, credentials: Credentials) -> None:
        """Write ``credentials`` to its principal's file (mode 0600), whole or not at all."""
        if not self.directory.exists():
            # A directory of secrets beside a policy file must not be committed with it.
            self.directory.mkdir(mode=0o700, parents=True)
            write_private(self.directory / ".gitignore", "*\n")
        write_private(self.path(credentials.principal), credentials.env())

    def remove(self, principal: str) -> None:
        self.path(principal).unlink(missing_ok=True)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only (0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover partial file keeps the mode it had
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(partial, path)
