"""A TCP proxy for fault tests: late replies, silent peers and dropped clients on demand.

Tests point a client at ``proxy.port`` (or ``proxy.url_for(url)``) instead of the real service,
then break the path in one of the ways a network does, and observe what the client makes of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

__all__ = ["Proxy"]

_CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's socket, the server's, and the two pumps between."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    silent: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``host``:``target_port`` until told otherwise."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host = host
        self.target_port = target_port
        self.accepted = 0
        """Client connections accepted so far, silent or not."""
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._silent = False
        self._refusing = False
        self._reply_delay = 0.0
        # Set and replaced whenever the delay changes, so replies held back re-check it at once.
        self._delay_changed = asyncio.Event()

    @classmethod
    def for_url(cls, url: str) -> Proxy:
        """A proxy to the host and port of a ``scheme://…`` URL."""
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError("the URL must name a host and a port")
        return cls(parts.hostname, parts.port)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (credentials and path kept)."""
        parts = urlsplit(url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}"))

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def delay_replies(self, seconds: float) -> None:
        """Hold bytes from the server ``seconds`` after they arrive; 0 releases held ones now."""
        self._reply_delay = seconds
        self._delay_changed.set()
        self._delay_changed = asyncio.Event()

    def silence(self) -> None:
        """Forward nothing either way, on current and new connections, and close no socket."""
        self._silent = True
        for link in self._links:
            link.silent = True

    def drop_clients(self) -> None:
        """Close the client side of every connection; the server side stays open and silent."""
        for link in list(self._links):
            link.silent = True
            link.client.close()

    def refuse_clients(self) -> None:
        """Close every new connection at once, as a broker that is down would refuse it."""
        self._refusing = True

    def accept_clients(self) -> None:
        """Forward new connections again (after ``refuse_clients``)."""
        self._refusing = False

    def resume(self) -> None:
        """Forward again on connections made from now on (silenced ones stay silent)."""
        self._silent = False

    async def close(self) -> None:
        """Stop listening and close every socket."""
        if self._server is not None:
            self._server.close()
        links, self._links = self._links, set()
        for link in links:
            for task in link.tasks:
                task.cancel()
            for writer in (link.client, link.server):
                if writer is not None:
                    writer.close()
        for link in links:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.close()
            return
        self.accepted += 1
        link = _Link(client=writer, silent=self._silent)
        self._links.add(link)
        if link.silent:
            # A black hole: the connect succeeds and nothing ever answers.
            return
        try:
            server_reader, link.server = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            self._links.discard(link)
            writer.close()
            return
        link.tasks = {
            asyncio.create_task(self._pump(reader, link.server, link, reply=False)),
            asyncio.create_task(self._pump(server_reader, writer, link, reply=True)),
        }

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        reply: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                if reply:
                    await self._hold(asyncio.get_running_loop().time())
                if link.silent:
                    continue  # read and dropped, as a broken network path would
                writer.write(data)
                await writer.drain()
        if not link.silent:
            # One side closed: pass that on by closing both, as a plain TCP path would.
            self._links.discard(link)
            link.client.close()
            if link.server is not None:
                link.server.close()

    async def _hold(self, arrived: float) -> None:
        loop = asyncio.get_running_loop()
        while (left := arrived + self._reply_delay - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._delay_changed.wait(), left)
