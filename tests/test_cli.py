"""The ``mesh`` command's answers to a missing broker and to bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def mesh(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unreachable_broker_is_named_without_the_password() -> None:
    """A command without a broker exits 1 naming where it looked, never the password."""
    port = free_port()
    result = mesh("ping", MESH_AMQP_URL=f"amqp://guest:s3cret@127.0.0.1:{port}/")
    assert result.returncode == 1
    assert f"RabbitMQ unreachable at 127.0.0.1:{port}/" in result.stderr
    assert "MESH_AMQP_URL" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_bad_input_gets_a_clear_error() -> None:
    """Invalid names, payloads and agent classes are refused, before any connection."""
    nowhere = {"MESH_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}
    result = mesh("call", "v7", "bad.op", **nowhere)
    assert result.returncode != 0
    assert "invalid operation 'bad.op'" in result.stderr

    result = mesh("call", "v7", "status", "{not json", **nowhere)
    assert result.returncode != 0
    assert "payload is not JSON" in result.stderr

    result = mesh("run", "examples.vehicles:Nope", "--id", "x", **nowhere)
    assert result.returncode != 0
    assert "is not an Agent subclass" in result.stderr
