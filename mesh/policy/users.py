"""The broker user of a principal: what provisioning creates and the gateway checks."""

from __future__ import annotations


def broker_user(namespace: str, principal: str) -> str:
    """The RabbitMQ user provisioned for ``principal`` in the mesh ``namespace``.

    Broker users are server-wide: the namespace keeps two meshes on one broker apart.
    """
    return f"{namespace}.{principal}"
