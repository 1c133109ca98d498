"""The ``mesh`` command's answers to a missing broker and to bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from helpers import free_port

from mesh.devservices import Services

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

    result = mesh("run", "examples.vehicles:Reading", "--id", "x", **nowhere)
    assert result.returncode != 0
    assert "'examples.vehicles:Reading' is not an Agent subclass" in result.stderr


def test_run_names_the_missing_class_and_the_modules_agents() -> None:
    """A misspelt class is named, with the Agent classes the module does have."""
    result = mesh("run", "examples.vehicles:Vehicel", "--id", "v1")
    assert result.returncode == 2
    assert "module 'examples.vehicles' has no 'Vehicel'" in result.stderr
    assert "Agent classes in it: Intruder, Monitor, Vehicle" in result.stderr
    assert "Traceback" not in result.stderr

    result = mesh("run", "plant:Sensor", "--id", "v1")
    assert result.returncode == 2
    assert (
        f"cannot import 'plant': No module named 'plant'; looked in the current directory ({ROOT})"
        in " ".join(result.stderr.split())  # click wraps long lines
    ), result.stderr


def test_missing_vhost_and_bad_password_are_named_in_one_line(services: Services) -> None:
    """A vhost the user cannot open, or a refused login, is one line naming vhost and user
    (not an InvalidFrameError traceback, nor "unreachable")."""
    broker = urlsplit(services.settings.amqp_url)
    where = f"{broker.hostname}:{broker.port or 5672}"
    result = mesh("ping", MESH_AMQP_URL=f"amqp://guest:guest@{where}/no-such-vhost")
    assert result.returncode == 1
    assert (
        "refused user 'guest' access to vhost 'no-such-vhost': it does not exist or the user "
        "has no permissions there" in result.stderr
    )
    assert "Traceback" not in result.stderr

    result = mesh("ping", MESH_AMQP_URL=f"amqp://guest:not-the-password@{where}/")
    assert result.returncode == 1
    assert "refused the login of user 'guest'" in result.stderr
    assert "not-the-password" not in result.stderr
    assert "Traceback" not in result.stderr


def test_run_without_a_broker_says_so_in_lines_of_its_own_and_exits_1() -> None:
    """``mesh run`` keeps trying for MESH_CONNECT_TIMEOUT with one warning, then fails with
    one error line, and that is all it prints: no traceback, no line per attempt from aio-pika
    or aiormq."""
    port = free_port()
    result = mesh(
        "run",
        "examples.vehicles:Vehicle",
        "--id",
        "v1",
        MESH_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/",
        MESH_CONNECT_TIMEOUT="1.5",
    )
    assert result.returncode == 1
    unreachable = [line for line in result.stderr.splitlines() if "RabbitMQ unreachable" in line]
    assert len(unreachable) == 2, result.stderr  # "trying again for 1.5s", then the error
    assert "trying again for 1.5s" in unreachable[0]
    # Nor mode's lifecycle lines, nor "agent v1 stopped" for an agent that never started.
    assert result.stderr.splitlines() == unreachable, result.stderr
    for noise in ("Traceback", "Reconnecting after", "error when creating transport"):
        assert noise not in result.stderr
