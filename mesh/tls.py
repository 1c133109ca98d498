"""TLS to RabbitMQ and Redis: on when their URLs say ``amqps://`` / ``rediss://``.

The certificates come from settings (``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``:
files mounted from Kubernetes Secrets, say), the same for both services: one CA signs the
servers' certificates, and the client certificate, when given, is the process's own.
Without a CA file the system's trust store verifies the servers.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

from mesh.config import Settings


def amqp_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The context an ``amqps://`` connection verifies the broker with and presents the
    client certificate from; ``None`` for ``amqp://``."""
    if urlsplit(settings.amqp_url).scheme != "amqps":
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca_file)
    if settings.tls_cert_file is not None:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


def redis_tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's keyword arguments for a ``rediss://`` URL (none for ``redis://``: its
    plain connection takes no ``ssl_*`` arguments)."""
    if urlsplit(settings.redis_url).scheme != "rediss":
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if settings.tls_ca_file is not None:
        options["ssl_ca_certs"] = settings.tls_ca_file
    if settings.tls_cert_file is not None:
        options["ssl_certfile"] = settings.tls_cert_file
        options["ssl_keyfile"] = settings.tls_key_file
    return options
