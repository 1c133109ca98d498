"""``/health`` and ``/ready``: for probes, without a token."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mesh.bridge.models import Health, Ready
from mesh.bridge.service import bridge_of


async def health(request: Request) -> Response:
    """The process answers.
    ---
    summary: Whether the bridge process answers
    security: []
    responses:
      "200":
        description: It does.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Health"}
    """
    bridge = bridge_of(request)
    body = Health(
        status="ok",
        agent=bridge.agent.id,
        instance=bridge.agent.instance,
        mode="open" if bridge.open_mode else "policy",
    )
    return JSONResponse(body.model_dump())


async def ready(request: Request) -> Response:
    """Ready only when the broker and Redis answer.
    ---
    summary: Whether the bridge reaches the broker and Redis
    security: []
    responses:
      "200":
        description: Both answer.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Ready"}
      "503":
        description: One does not; its field says what is wrong.
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Ready"}
    """
    checks = await bridge_of(request).readiness()
    ok = all(value == "ok" for value in checks.values())
    body = Ready(ready=ok, broker=checks["broker"], redis=checks["redis"])
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
