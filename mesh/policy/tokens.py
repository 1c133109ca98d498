"""Bearer tokens of the policy's users, kept beside the policy as SHA-256 hashes only.

A token is 256 random bits, shown once when issued.  A plain SHA-256 suffices: slow,
salted hashes protect guessable passwords, and nobody guesses 256 random bits from their
hash.  The file (``policy.tokens.json`` beside ``policy.yaml``) is written whole, mode 0600,
under a lock, so two ``mesh token`` commands at once cannot lose each other's change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from mesh.policy.policy import Policy

TOKEN_PREFIX = "mesh_"
"""Marks a mesh token in logs and secret scanners."""

_TOKEN_BYTES = 32


class TokenError(ValueError):
    """A token cannot be issued or revoked, or the tokens file is unreadable; the message
    says which and why."""


class TokenRecord(BaseModel):
    """One issued token: whose, its hash, when issued and (once) revoked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    sha256: str
    created: datetime
    revoked: datetime | None = None


class _TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[TokenRecord] = []


def tokens_path(policy_file: str | Path) -> Path:
    """The tokens file beside ``policy_file``: ``policy.yaml`` → ``policy.tokens.json``."""
    policy_file = Path(policy_file)
    return policy_file.with_name(f"{policy_file.stem}.tokens.json")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The tokens of the users (token principals) named ``users``, in the file ``path``."""

    def __init__(self, path: str | Path, users: Iterable[str]) -> None:
        self.path = Path(path)
        self.users = frozenset(users)
        self._records: list[TokenRecord] = []
        self._seen: tuple[int, int, int] | None = None

    @classmethod
    def for_policy(cls, policy: Policy) -> TokenStore:
        """The store beside the file ``policy`` was loaded from, for its users."""
        if policy.source is None:
            raise TokenError("the policy was not read from a file: no tokens file beside it")
        users = (p.name for p in policy.principals() if p.kind == "user")
        return cls(tokens_path(policy.source), users)

    def records(self) -> list[TokenRecord]:
        """Every token issued, revoked ones too, oldest first."""
        self._refresh()
        return list(self._records)

    def issue(self, name: str) -> str:
        """A new token for user ``name``, to be shown once: only its hash is kept."""
        if name not in self.users:
            raise TokenError(
                f"{name!r} is no token principal of the policy (users: "
                f"{', '.join(sorted(self.users)) or 'none'}): declare it with kind: user"
            )
        token = TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)
        with self._locked() as records:
            active = next((r for r in records if r.name == name and r.revoked is None), None)
            if active is not None:
                raise TokenError(
                    f"{name!r} has a token already (issued {active.created:%Y-%m-%d %H:%M} "
                    f"UTC); revoke it first: mesh token revoke {name}"
                )
            records.append(TokenRecord(name=name, sha256=_digest(token), created=_now()))
        return token

    def revoke(self, name: str) -> TokenRecord:
        """Revoke ``name``'s token; it verifies no more.  Returns the revoked record."""
        with self._locked() as records:
            for i, record in enumerate(records):
                if record.name == name and record.revoked is None:
                    records[i] = record.model_copy(update={"revoked": _now()})
                    revoked = records[i]
                    break
            else:
                raise TokenError(f"{name!r} has no token to revoke in {self.path}")
        return revoked

    def verify(self, token: str) -> str | None:
        """The user ``token`` belongs to, or ``None`` (unknown, revoked, or its user is no
        longer in the policy).

        Every hash is compared in constant time, with no early exit, so the time taken
        tells nothing about how close a guess came.  The file is read again when it
        changed, so a revocation holds at once.
        """
        self._refresh()
        digest = _digest(token)
        found = None
        for record in self._records:
            if hmac.compare_digest(record.sha256, digest) and record.revoked is None:
                found = record.name
        return found if found in self.users else None

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._records, self._seen = [], None
            return
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            self._records, self._seen = self._read(), seen

    def _read(self) -> list[TokenRecord]:
        try:
            return _TokensFile.model_validate_json(self.path.read_bytes()).tokens
        except FileNotFoundError:
            return []
        except (OSError, ValidationError) as exc:
            raise TokenError(f"cannot read the tokens file {self.path}: {exc}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[TokenRecord]]:
        """The records to change, written back (mode 0600) when the block succeeds."""
        lock = os.open(self.path.with_name(self.path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self._read()
            yield records
            self._write(records)
        finally:
            os.close(lock)  # closing releases the lock
        self._refresh()

    def _write(self, records: list[TokenRecord]) -> None:
        data = _TokensFile(tokens=records).model_dump(mode="json")
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        # mkstemp creates it 0600 whatever the umask, and os.replace keeps the mode.
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=2)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            # Replaced whole, so a reader never sees half a file.
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
