"""Connecting to RabbitMQ: first attempts that back off, reconnects that back off, one log line
per outage instead of one per attempt."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import AMQPConnectionError

from mesh.shortstr import tolerate_undecodable_short_strings

logger = logging.getLogger(__name__)

FIRST_RETRY = 0.5
"""Seconds before the second attempt; each wait after doubles, up to ``LONGEST_RETRY``."""
LONGEST_RETRY = 30.0


class BrokerUnavailable(ConnectionError):
    """RabbitMQ cannot be reached, or refused the login or the vhost; the text says which."""


class BackoffConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, reconnecting after waits that grow with the outage.

    aio-pika waits a fixed ``reconnect_interval`` (5 s) after each failed attempt.  Here the
    wait is read from how long the broker has been gone: half a second at first, then
    about half the outage so far, up to ``LONGEST_RETRY``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lost_at: float | None = None
        super().__init__(*args, **kwargs)
        self.close_callbacks.add(self._on_lost)

    @property
    def reconnect_interval(self) -> float:
        if self._lost_at is None:
            return FIRST_RETRY
        outage = asyncio.get_running_loop().time() - self._lost_at
        return min(max(FIRST_RETRY, outage / 2), LONGEST_RETRY)

    @reconnect_interval.setter
    def reconnect_interval(self, _value: float) -> None:
        """aio-pika sets its fixed interval here; the wait above replaces it."""

    @property
    def lost(self) -> bool:
        """Whether the connection was lost and is not back yet (channels restored)."""
        return self._lost_at is not None

    def _on_lost(self, _sender: Any, exc: BaseException | None) -> None:
        if exc is None or self._close_called or self._lost_at is not None:
            return  # closed on purpose, or still the same outage
        if not self.connection_attempt:
            return  # never connected: ``connect`` reports a first attempt that failed
        self._lost_at = asyncio.get_running_loop().time()
        logger.warning("lost the connection to RabbitMQ (%s); reconnecting", exc)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        if self._lost_at is not None:
            outage = asyncio.get_running_loop().time() - self._lost_at
            logger.warning("reconnected to RabbitMQ after %.1fs", outage)
            self._lost_at = None


class _PerAttemptNoise(logging.Filter):
    """Drops aio-pika's and aiormq's line per failed (re)connection attempt.

    ``BackoffConnection`` says once that the connection is lost and once that it is back;
    a line per attempt (every half second at first) tells an operator nothing more.
    """

    NOISE = (
        "Connection to %s closed. Reconnecting after",
        'Connection attempt to "%s" failed',
        "error when creating transport",
        "Reconnect attempt failed",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


_quiet = _PerAttemptNoise()
logging.getLogger("aio_pika.robust_connection").addFilter(_quiet)
logging.getLogger("aiormq.connection").addFilter(_quiet)


async def connect(
    url: str,
    name: str,
    *,
    where: str,
    vhost: str,
    user: str,
    wait: float,
    ssl_context: ssl.SSLContext | None = None,
) -> AbstractRobustConnection:
    """Connect to ``url``, trying again for ``wait`` seconds while the broker is unreachable.

    ``ssl_context`` (for ``amqps://``) verifies the broker and holds the client certificate.

    A refused login or vhost fails at once: waiting does not fix a wrong password.
    """
    tolerate_undecodable_short_strings()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = FIRST_RETRY
    while True:
        try:
            connection: AbstractRobustConnection = await aio_pika.connect_robust(
                url,
                client_properties={"connection_name": name},
                connection_class=BackoffConnection,
                ssl_context=ssl_context,
            )
            return connection
        except aiormq.exceptions.ProbableAuthenticationError:
            raise BrokerUnavailable(
                f"RabbitMQ at {where} refused the login of user {user!r}: "
                "check the user and password in MESH_AMQP_URL"
            ) from None
        except aiormq.exceptions.InvalidFrameError:
            # The broker answers Connection.Open with a close: no such vhost, or no access.
            raise BrokerUnavailable(
                f"RabbitMQ at {where} refused user {user!r} access to vhost {vhost!r}: it does "
                "not exist or the user has no permissions there (rabbitmqctl add_vhost / "
                "set_permissions)"
            ) from None
        except (AMQPConnectionError, OSError) as exc:
            problem = (
                f"RabbitMQ unreachable at {where}/{vhost.lstrip('/')} ({exc}); start it or "
                "point MESH_AMQP_URL at it"
            )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BrokerUnavailable(problem) from None
            if delay == FIRST_RETRY:
                logger.warning("%s; trying again for %gs", problem, wait)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, LONGEST_RETRY)
