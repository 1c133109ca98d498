"""Schemathesis against the bridge's own OpenAPI document: generated requests, valid and
invalid, to every operation get no server error and a response the document describes.

Bounded: a few examples per operation and mode, so the whole run takes seconds.  The event
stream (``/stream``) is left out: it answers with a stream that does not end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from bridge_support import POLICY, Mesh, delete_users, provisioned, running_bridge
from hypothesis import HealthCheck
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mesh import Settings

FUZZ_POLICY = POLICY.replace(
    '{allow: control, who: operator, control: {agent: "svc*", command: "*"}}',
    '{allow: control, who: operator, control: {agent: "*", command: "*"}}',
).replace(
    '{allow: request, who: [viewer, operator], request: {agent: "svc*", operation: "*"}}',
    '{allow: request, who: [viewer, operator], request: {agent: "*", operation: "*"}}',
).replace(
    "rules:\n",
    'rules:\n      - {allow: publish, who: operator, topics: "#"}\n',
    1,
)
"""The operator may publish anywhere, call and control any agent: generated requests get
past the policy to the registry, the schemas and the gateway."""

EXAMPLES = 25
"""Generated requests per operation and generation mode."""
SLOW = {"GET /dead": 5, "POST /dead/{id}/redrive": 5}
"""Fewer for these: each reads the mesh.dead stream to its end (about a second when empty)."""

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def fuzz(url: str, token: str) -> list[str]:
    """Run the checks on every operation; the operations checked."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json").exclude(path="/stream")
    headers = {"Authorization": f"Bearer {token}"}
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=SLOW.get(operation.label, EXAMPLES),
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                # Nothing to make invalid (no parameters, no body): only POSITIVE applies.
                assert mode is GenerationMode.NEGATIVE, operation.label
        checked.append(operation.label)
    return checked


@pytest.fixture
async def lax_mesh(settings: Settings, tmp_path: Path) -> AsyncIterator[Mesh]:
    try:
        yield await provisioned(settings, tmp_path, FUZZ_POLICY)
    finally:
        await delete_users(settings)


async def test_generated_requests_get_documented_answers(lax_mesh: Mesh) -> None:
    mesh = lax_mesh
    async with running_bridge(mesh, serve=True) as live:
        token = live.mesh.token("operator")
        # schemathesis is synchronous (requests): in a thread, while this loop serves.
        checked = await asyncio.to_thread(fuzz, f"http://{live.url}", token)
    assert "POST /topics/{topic}" in checked
    assert "POST /agents/{agent}/rpc/{operation}" in checked
    assert "GET /audit" in checked
    assert "GET /dead" in checked and "POST /dead/{id}/redrive" in checked
    assert len(checked) == 11
