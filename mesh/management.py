"""RabbitMQ's management HTTP API: what AMQP cannot do (list queues, make vhosts).

The management plugin (``rabbitmq_management``) must be enabled on the broker; ``make test``
and ``make demo`` enable it on the broker they use.  Calls run the standard library's HTTP
client in a thread: an operator's tool makes a few calls, and a client library for that would
be one more dependency.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from mesh.config import Settings

DEFAULT_PORT = 15672

_QUEUE_COLUMNS = "name,type,messages,consumers,arguments,durable,exclusive,auto_delete"


class ManagementError(RuntimeError):
    """The management API refused a call or does not answer; the text says which and why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status of a refusal; None when the API did not answer."""


@dataclass(frozen=True)
class QueueInfo:
    """One queue as the management API lists it (depth and consumers are sampled every few
    seconds by the broker, so they lag a little)."""

    name: str
    type: str
    messages: int
    consumers: int
    arguments: dict[str, Any] = field(default_factory=dict)


def management_url(settings: Settings) -> str:
    """``settings.management_url``, or the AMQP URL's host and user on port 15672."""
    if settings.management_url:
        return settings.management_url
    amqp = urlsplit(settings.amqp_url)
    netloc = amqp.netloc.rsplit("@", 1)
    credentials = f"{netloc[0]}@" if len(netloc) == 2 else "guest:guest@"
    host = amqp.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if amqp.scheme == "amqps" else "http"
    return urlunsplit((scheme, f"{credentials}{host}:{DEFAULT_PORT}", "/", "", ""))


def vhost_of(settings: Settings) -> str:
    """The vhost an AMQP URL names (``/`` when it names none)."""
    path = urlsplit(settings.amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


class ManagementAPI:
    """A few calls of the management API, as the user in the URL."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ManagementError(f"management URL must be http:// or https://, not {url!r}")
        user = unquote(parts.username or "guest")
        password = unquote(parts.password or "guest")
        host = parts.hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        self.base = urlunsplit((parts.scheme, f"{host}{port}", parts.path.rstrip("/"), "", ""))
        """The URL without credentials: what error messages show."""
        self.user = user
        self.timeout = timeout
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"

    @classmethod
    def for_settings(cls, settings: Settings) -> ManagementAPI:
        return cls(management_url(settings))

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """``method`` on ``/api/<path>``; the decoded JSON answer (``None`` when empty)."""
        return await asyncio.to_thread(self._call, method, path, body)

    def _call(self, method: str, path: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base}/api/{path}",
            data=data,
            method=method,
            headers={"Authorization": self._auth, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise self._refused(method, path, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ManagementError(
                f"RabbitMQ's management API does not answer at {self.base} ({reason}); "
                "enable it with `rabbitmq-plugins enable rabbitmq_management`, or point "
                "MESH_MANAGEMENT_URL at it"
            ) from None
        return json.loads(raw) if raw else None

    def _refused(self, method: str, path: str, exc: urllib.error.HTTPError) -> ManagementError:
        try:
            detail = json.loads(exc.read()).get("reason", "")
        except (ValueError, AttributeError):
            detail = ""
        if exc.code == 401:
            return ManagementError(
                f"the management API at {self.base} refused user {self.user!r} "
                "(wrong password, or the user lacks the management tag)",
                401,
            )
        return ManagementError(
            f"{method} {self.base}/api/{path}: HTTP {exc.code} {exc.reason}"
            + (f": {detail}" if detail else ""),
            exc.code,
        )

    async def create_vhost(self, vhost: str) -> None:
        """Create ``vhost`` and give the API's user every permission on it."""
        await self.call("PUT", f"vhosts/{_part(vhost)}", {})
        await self.call(
            "PUT",
            f"permissions/{_part(vhost)}/{_part(self.user)}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    async def delete_vhost(self, vhost: str) -> None:
        """Delete ``vhost`` and everything in it (a vhost that is gone already is fine)."""
        try:
            await self.call("DELETE", f"vhosts/{_part(vhost)}")
        except ManagementError as exc:
            if exc.status != 404:
                raise

    async def queues(self, vhost: str) -> list[QueueInfo]:
        """Every queue in ``vhost``."""
        try:
            found = await self.call("GET", f"queues/{_part(vhost)}?columns={_QUEUE_COLUMNS}")
        except ManagementError as exc:
            if exc.status != 404:
                raise
            raise ManagementError(
                f"vhost {vhost!r} does not exist on the broker at {self.base}", 404
            ) from None
        return [
            QueueInfo(
                name=q["name"],
                type=q.get("type", "classic"),
                messages=int(q.get("messages") or 0),
                consumers=int(q.get("consumers") or 0),
                arguments=q.get("arguments") or {},
            )
            for q in found or []
        ]

    async def delete_queue(self, vhost: str, name: str) -> None:
        await self.call("DELETE", f"queues/{_part(vhost)}/{_part(name)}")

    async def delete_exchange(self, vhost: str, name: str) -> None:
        await self.call("DELETE", f"exchanges/{_part(vhost)}/{_part(name)}")

    async def vhosts(self) -> list[str]:
        """The names of every vhost the API's user may see."""
        return [v["name"] for v in await self.call("GET", "vhosts?columns=name") or []]

    async def put_user(self, name: str, password: str, tags: Sequence[str] = ()) -> None:
        """Create user ``name`` (or replace its password and tags)."""
        await self.call(
            "PUT", f"users/{_part(name)}", {"password": password, "tags": ",".join(tags)}
        )

    async def delete_user(self, name: str) -> None:
        """Delete user ``name`` and its permissions (a user that is gone already is fine)."""
        try:
            await self.call("DELETE", f"users/{_part(name)}")
        except ManagementError as exc:
            if exc.status != 404:
                raise

    async def set_permissions(
        self, vhost: str, user: str, configure: str, write: str, read: str
    ) -> None:
        """Set ``user``'s permissions on ``vhost``: regexes over exchange and queue names."""
        await self.call(
            "PUT",
            f"permissions/{_part(vhost)}/{_part(user)}",
            {"configure": configure, "write": write, "read": read},
        )

    async def set_topic_permissions(
        self, vhost: str, user: str, exchange: str, write: str, read: str
    ) -> None:
        """Set ``user``'s topic permissions on one topic exchange: regexes over the routing
        keys it may publish (``write``) and the binding keys it may bind (``read``)."""
        await self.call(
            "PUT",
            f"topic-permissions/{_part(vhost)}/{_part(user)}",
            {"exchange": exchange, "write": write, "read": read},
        )

    async def users(self) -> list[UserInfo]:
        """Every user of the broker (users are server-wide), with tags and password hash."""
        return [
            UserInfo(
                name=u["name"],
                tags=_tags(u.get("tags")),
                password_hash=u.get("password_hash") or "",
                hashing_algorithm=u.get("hashing_algorithm") or "",
            )
            for u in await self.call("GET", "users") or []
        ]

    async def permissions(self, vhost: str) -> list[PermissionInfo]:
        """Every user's permissions on ``vhost``."""
        return [
            PermissionInfo(p["user"], p["configure"], p["write"], p["read"])
            for p in await self.call("GET", f"vhosts/{_part(vhost)}/permissions") or []
        ]

    async def topic_permissions(self, vhost: str) -> list[TopicPermissionInfo]:
        """Every user's topic permissions on ``vhost``, one per user and exchange."""
        return [
            TopicPermissionInfo(p["user"], p["exchange"], p["write"], p["read"])
            for p in await self.call("GET", f"vhosts/{_part(vhost)}/topic-permissions") or []
        ]

    async def exchanges(self, vhost: str) -> list[str]:
        """The names of every exchange in ``vhost`` (the default one is ``""``)."""
        found = await self.call("GET", f"exchanges/{_part(vhost)}?columns=name")
        return [e["name"] for e in found or []]

    async def import_definitions(self, definitions: Any, vhost: str | None = None) -> None:
        """Import RabbitMQ definitions: server-wide, or into ``vhost`` (whose objects then
        name no vhost).  What exists already is left as it is."""
        path = "definitions" if vhost is None else f"definitions/{_part(vhost)}"
        await self.call("POST", path, definitions)


def _part(value: str) -> str:
    return quote(value, safe="")


def _tags(value: Any) -> tuple[str, ...]:
    # RabbitMQ 3.9 and later list a user's tags; earlier versions join them with commas.
    if isinstance(value, str):
        value = value.split(",")
    return tuple(tag for tag in value or () if tag)


@dataclass(frozen=True)
class UserInfo:
    """A broker user as the management API lists it."""

    name: str
    tags: tuple[str, ...]
    password_hash: str
    """Base64 of a 4-byte salt and the hash of salt + password (``hashing_algorithm``)."""
    hashing_algorithm: str


@dataclass(frozen=True)
class PermissionInfo:
    """A user's permissions on one vhost: regexes over exchange and queue names."""

    user: str
    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class TopicPermissionInfo:
    """A user's topic permissions on one exchange: regexes over routing and binding keys."""

    user: str
    exchange: str
    write: str
    read: str
