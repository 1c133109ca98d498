"""The bridge: REST, websocket and Server-Sent Events access to the mesh, governed by the
mesh's policy for each caller.

A caller presents a bearer token of a policy user; the bridge, an agent with its own broker
user (principal kind ``bridge``), checks what the caller asks against the policy and the
payload schemas, then sends it on the caller's behalf (``x-mesh-on-behalf-of``), and the
gateway authorizes the caller, not the bridge.  One module per concept: ``service``
(``Bridge``), ``app`` (``create_app``), ``auth`` (tokens), ``access`` (the policy's
decisions), ``actions`` (publish, request, control), ``routes`` (REST, one module per
resource), ``websocket`` (the protocol, documented there), ``sse``, ``stream`` (the live
fan-out), ``outbox`` (a client's bounded buffer), ``outcomes`` (what became of a publish),
``openapi``, ``errors``, ``inputs``, ``server`` (uvicorn).
"""

from mesh.bridge.app import create_app
from mesh.bridge.auth import Caller
from mesh.bridge.config import BridgeConfig
from mesh.bridge.service import Bridge, BridgeError

__all__ = ["Bridge", "BridgeConfig", "BridgeError", "Caller", "create_app"]
