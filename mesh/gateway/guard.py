"""Guard stage: the gateway's own lifecycle is not the mesh's to change."""

from __future__ import annotations

from mesh.gateway.pipeline import Denied, Passage

_READ_ONLY = frozenset({"ping"})


class Guard:
    """Refuses control commands aimed at the gateway, other than ``ping``.

    Control travels through the relay itself: a relay stopped over the mesh could never
    be started again over the mesh.  Its lifecycle belongs to its process (and, with the
    policy, to the operator role).
    """

    name = "guard"

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self._prefix = f"_ctl.{gateway}."

    async def __call__(self, passage: Passage) -> None:
        key = passage.routing_key
        if key.startswith(self._prefix) and key[len(self._prefix) :] not in _READ_ONLY:
            raise Denied(
                self.name,
                f"the gateway {self.gateway!r} takes no control commands over the mesh "
                "but ping; stop or restart its process instead",
            )
