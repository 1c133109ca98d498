"""The REST API's OpenAPI 3.1 document (``/openapi.json``) and its docs page (``/docs``).

Operations come from the endpoints' docstrings (Starlette's ``SchemaGenerator``), the body
schemas from the pydantic models (``mesh.bridge.models``), the rest from here.  The page is
one self-contained HTML file (no CDN, no build step): it reads the document, lists every
operation, and sends a request with the token typed in.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.schemas import SchemaGenerator

from mesh.bridge.config import BridgeConfig
from mesh.bridge.inputs import MAX_SCHEMA_ID
from mesh.bridge.models import SCHEMAS

WEBSOCKET = """\
Live messages, publishing and requests over a websocket at `/ws` (or the same stream as
Server-Sent Events at `GET /stream`): see the bridge section of docs/architecture.md and the
docstring of `mesh.bridge.websocket`."""


NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"}
"""An agent, operation or behaviour name (``topology.check_name``)."""
TOPIC = {
    "type": "string",
    "maxLength": 255,
    "pattern": "^[A-Za-z0-9-][A-Za-z0-9_-]*(\\.[A-Za-z0-9_-]+)*$",
}
"""A topic one may publish to (``topology.check_topic``)."""


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        **extra,
    }


def base_document(config: BridgeConfig, version: str) -> dict[str, Any]:
    """Everything but the paths."""
    _, definitions = models_json_schema(
        [(model, "serialization") for model in SCHEMAS],
        ref_template="#/components/schemas/{model}",
    )
    timeout = {"type": "number", "exclusiveMinimum": 0, "maximum": config.max_timeout}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "agentmesh bridge",
            "version": version,
            "description": "REST access to the mesh, every call governed by the mesh's "
            "policy for the token's principal.\n\n" + WEBSOCKET,
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `mesh token issue NAME --policy policy.yaml`.",
                }
            },
            "schemas": definitions.get("$defs", {}),
            "parameters": {
                "agent": {
                    "name": "agent",
                    "in": "path",
                    "required": True,
                    "schema": NAME,
                    "description": "An agent id.",
                },
                "operation": {
                    "name": "operation",
                    "in": "path",
                    "required": True,
                    "schema": NAME,
                },
                "behaviour": {
                    "name": "behaviour",
                    "in": "path",
                    "required": True,
                    "schema": NAME,
                },
                "topic": {
                    "name": "topic",
                    "in": "path",
                    "required": True,
                    "schema": TOPIC,
                    "description": "A topic: words of letters, digits, '-' and '_' joined by "
                    "dots, not starting with '_' (no wildcards).",
                },
                "schema": {
                    "name": "schema",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_SCHEMA_ID},
                    "description": "The payload's schema version, name@version (x-mesh-schema).",
                },
                "timeout": {
                    "name": "timeout",
                    "in": "query",
                    "required": False,
                    "schema": timeout,
                    "description": "Seconds to wait for the reply (default MESH_REQUEST_TIMEOUT).",
                },
                "control_timeout": {
                    "name": "timeout",
                    "in": "query",
                    "required": False,
                    "schema": timeout,
                    "description": "Seconds to collect the instances' answers "
                    f"(default {config.control_timeout:g}).",
                },
            },
            "responses": {
                "BadRequest": _error(
                    "Malformed input: a name, topic, query parameter or JSON body."
                ),
                "Unauthorized": _error(
                    "No token, or a malformed, unknown or revoked one.",
                    headers={"WWW-Authenticate": {"schema": {"type": "string"}}},
                ),
                "Forbidden": _error(
                    "The policy denies it to the caller (the bridge's check or the gateway's)."
                ),
                "NotFound": _error(
                    "No such agent, operation, behaviour or dead letter, or none alive."
                ),
                "Conflict": _error(
                    "The dead letter was redriven already, or another redrive of it is under way."
                ),
                "TooLarge": _error(f"The body is over {config.max_body} bytes."),
                "SchemaViolation": _error(
                    "The payload does not follow a schema version its topic or operation "
                    "accepts (checked before sending)."
                ),
                "RemoteError": _error(
                    "The agent's handler failed: remote_type and error are its error."
                ),
                "Unavailable": _error("The broker or Redis did not answer."),
                "Timeout": _error("No answer in time; deadline is when the wait ended."),
                "Other": _error("Any other refusal (405: a method the path does not take)."),
                "Controlled": {
                    "description": "The instances that answered, each with its result.",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ControlResult"}
                        }
                    },
                },
            },
        },
    }


OTHER = {"$ref": "#/components/responses/Other"}


class OpenAPI:
    """The document, built once from the app's routes when first asked for."""

    def __init__(self, config: BridgeConfig, version: str) -> None:
        self._generator = SchemaGenerator(base_document(config, version))
        self._document: dict[str, Any] | None = None

    def document(self, request: Request) -> dict[str, Any]:
        if self._document is None:
            document = self._generator.get_schema(request.app.routes)
            for item in document["paths"].values():
                for operation in item.values():
                    # Whatever else a route answers is an Error body (405, say).
                    operation["responses"].setdefault("default", OTHER)
            self._document = document
        return self._document

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(self.document(request))

    async def docs_page(self, _request: Request) -> Response:
        page = resources.files("mesh.bridge").joinpath("docs.html").read_text(encoding="utf-8")
        return HTMLResponse(page)
