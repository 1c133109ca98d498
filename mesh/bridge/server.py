"""Serving the bridge with uvicorn: the process ``mesh bridge`` runs."""

from __future__ import annotations

import logging
import re

import uvicorn

from mesh.bridge.app import create_app
from mesh.bridge.service import Bridge

GRACEFUL_SHUTDOWN = 5.0
"""Seconds open connections get to finish when the bridge is told to stop."""

_TOKEN_IN_QUERY = re.compile(r"(access_token=)[^&\s\"']+")


class RedactTokens(logging.Filter):
    """Blanks ``access_token=`` in uvicorn's lines: browsers put websocket and event-stream
    tokens in the query string, and logs are read by more people than tokens should be."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1…", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        if isinstance(record.msg, str):
            record.msg = _TOKEN_IN_QUERY.sub(r"\1…", record.msg)
        return True


def server(bridge: Bridge) -> uvicorn.Server:
    """A uvicorn server of ``bridge``'s app on its configured host and port; its lifespan
    starts and stops the bridge.  Logging is left as the process configured it."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactTokens())
    config = bridge.config
    return uvicorn.Server(
        uvicorn.Config(
            create_app(bridge),
            host=config.host,
            port=config.port,
            log_config=None,
            lifespan="on",
            ws_max_size=config.max_body,
            # A frame is encoded once for all its clients; compressing it would cost CPU
            # per client and frame (permessage-deflate keeps a context per connection).
            ws_per_message_deflate=False,
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN),
        )
    )
