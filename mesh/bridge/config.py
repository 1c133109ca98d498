"""How the bridge serves: where it listens, as which agent, and the bounds it keeps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BridgeConfig:
    """The bridge's own settings (``mesh bridge`` options, or ``MESH_BRIDGE_*``); the mesh's
    come from ``mesh.config.Settings`` as for every agent."""

    host: str = "127.0.0.1"
    port: int = 8080
    agent_id: str = "bridge"
    """The bridge's agent id: its principal in the policy must delegate (kind ``bridge``)."""
    gateway_id: str = "gateway"
    """The gateway's agent id: ``/dead`` is for callers the policy lets request its
    ``redrive`` operation, which redrives them."""
    insecure_open: bool = False
    """Serve without a policy: no tokens, every caller may do anything (first steps only)."""
    max_body: int = 1_048_576
    """Bytes a request body or websocket frame may have (larger: 413, or close 1009)."""
    send_buffer: int = 1000
    """Frames waiting for one live-stream client; a client that lets more pile up is slow and
    is disconnected (websocket close 4008), so it never holds up the mesh or other clients."""
    send_buffer_bytes: int = 8 * 1024 * 1024
    """The same bound in bytes."""
    in_flight: int = 100
    """Publishes and requests one websocket client may have outstanding at once."""
    max_timeout: float = 60.0
    """The longest reply timeout a caller may ask for (seconds)."""
    control_timeout: float = 2.0
    """How long a control command collects its instances' answers by default (seconds)."""
    stream_queue_length: int = 10_000
    """Messages the bridge's own stream queue keeps when the bridge falls behind; older ones
    are dropped (a stream copy is disposable: subscribers' own queues lose nothing)."""
    keepalive: float = 15.0
    """Seconds of silence after which an event stream sends a comment (proxies close idle
    connections)."""
    recheck: float = 5.0
    """Seconds between checks of a live stream's token: a revoked token's stream ends within
    this long (each websocket operation checks it at once)."""
    outcome_window: float = 60.0
    """How long the bridge remembers a websocket publish, to report what became of it."""
