"""Health: an agent process's HTTP port, ``/healthz``, ``/readyz`` and ``/metrics``.

Served by the standard library's asyncio server rather than uvicorn: uvicorn's server takes
SIGINT and SIGTERM for itself while it serves (``signal.signal``), which would keep them
from mode's Worker and so from the drain, and configures logging; three fixed answers to
GET need neither a framework nor a task of their own.  The server runs on the agent's event
loop, so that any answer at all shows the loop is turning.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Protocol

from mode import Service

from mesh.metrics import CONTENT_TYPE, Metrics

logger = logging.getLogger(__name__)

HEAD_LIMIT = 8192
"""Bytes a request's line and headers may take; probes and scrapers send a few hundred."""

READ_TIMEOUT = 5.0
"""Seconds a client has to send its request's head."""

TEXT = "text/plain; charset=utf-8"

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Probed(Protocol):
    """What the health port reports on: an ``Agent``."""

    @property
    def unready(self) -> str | None: ...
    @property
    def metrics(self) -> Metrics: ...


class HealthServer(Service):
    """Serves ``target``'s liveness, readiness and metrics on ``host``:``port``.

    Start it before the agent (it answers "not ready: starting" meanwhile) and stop it
    after (it answers "not ready: draining" while the agent drains): ``mesh run`` and
    ``mesh gateway`` do, when ``MESH_HEALTH_PORT`` is set.
    """

    def __init__(self, target: Probed, port: int, host: str = "0.0.0.0") -> None:
        super().__init__()
        self.target = target
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    @property
    def bound_port(self) -> int:
        """The port listened on (the one picked, for port 0)."""
        if self._server is None:
            raise RuntimeError("the health server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def on_start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=HEAD_LIMIT
        )
        logger.info(
            "health on http://%s:%d/ (healthz, readyz, metrics)", self.host, self.bound_port
        )

    async def on_stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for a request."""
        if method not in ("GET", "HEAD"):
            return 405, TEXT, b"GET only\n"
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, TEXT, b"ok\n"
        if path == "/readyz":
            problem = self.target.unready
            if problem is None:
                return 200, TEXT, b"ready\n"
            return 503, TEXT, f"not ready: {problem}\n".encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.target.metrics.exposition()
        return 404, TEXT, b"not found: /healthz, /readyz or /metrics\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one request, then close (``Connection: close``)."""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, content_type, body = self.answer(method, path)
            writer.write(
                (
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
                + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except (
            TimeoutError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass  # not HTTP, too long, too slow, or gone: nothing to answer
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
