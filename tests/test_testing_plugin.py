"""The pytest plugin (mesh.testing.plugin) as a user meets it: loaded through its entry point in
a pytest run of its own, against the real broker, with the README's example."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from helpers import free_port

from mesh import Agent, Message, rpc
from mesh.config import Settings
from mesh.management import ManagementAPI
from mesh.testing import MeshHarness

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Testing your behaviours"


class Echo(Agent):
    @rpc("echo")
    async def echo(self, msg: Message, payload: Any) -> Any:
        return payload


def readme_files() -> dict[str, str]:
    """The README section's code blocks by the file each names on its first line."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\w+\n# (\S+)\n(.*?)```", section, flags=re.DOTALL)
    return dict(blocks)


def test_the_readme_example_passes(pytester: pytest.Pytester) -> None:
    files = readme_files()
    assert set(files) == {"thermostat.py", "test_thermostat.py", "pyproject.toml"}
    for name, code in files.items():
        pytester.path.joinpath(name).write_text(code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


async def test_vhost_and_namespace_are_gone_after_a_test_passed_or_failed(
    pytester: pytest.Pytester, mesh_management: ManagementAPI, mesh_redis: aioredis.Redis
) -> None:
    """In strict mode: the fixtures are pytest-asyncio's own, so they work there too."""
    record = pytester.path / "used.jsonl"
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        test_user=f"""
        import json
        import pytest
        import pytest_asyncio
        from mesh.management import vhost_of

        pytestmark = pytest.mark.asyncio

        @pytest_asyncio.fixture
        async def used(mesh_harness, mesh_redis):
            settings = mesh_harness.settings
            await mesh_redis.set(settings.namespace + ":left-behind", "1")
            with open({str(record)!r}, "a") as out:
                out.write(json.dumps([vhost_of(settings), settings.namespace]) + "\\n")

        async def test_passes(used):
            pass

        async def test_waits_for_a_message_that_never_comes(used, mesh_harness):
            never = await mesh_harness.subscribe("never.#")
            await never.next(timeout=0.5)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "> * await never.next(timeout=0.5)",
            "E * AssertionError: no message on 'never.#' within 0.5s",
        ]
    )
    assert "harness.py" not in result.stdout.str()
    used = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(used) == 2
    vhosts = await mesh_management.vhosts()
    for vhost, namespace in used:
        assert vhost == f"mesh-{namespace}"
        assert vhost not in vhosts
        assert not [key async for key in mesh_redis.scan_iter(match=f"{namespace}:*")]


async def test_waiting_for_a_message_that_never_comes_fails_at_its_deadline(
    mesh_harness: MeshHarness,
) -> None:
    never = await mesh_harness.subscribe("never.#")
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"^no message on 'never.#' within 0.3s$"):
        await never.next(timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 1.3


async def test_subscribe_watches_the_mesh_lane_and_call_reaches_an_rpc(
    mesh_harness: MeshHarness,
) -> None:
    joins = await mesh_harness.subscribe("_registry.join")
    await mesh_harness.start(Echo("echo", settings=mesh_harness.settings))
    joined = await joins.next()
    assert joined.app_id == "echo"
    assert await mesh_harness.call("echo", "echo", {"x": 1}) == {"x": 1}


async def test_an_agent_on_other_settings_is_refused(mesh_harness: MeshHarness) -> None:
    """An agent built without settings= would run on the shared vhost, unseen by the test."""
    stray = Echo("echo", settings=Settings())
    with pytest.raises(ValueError, match=r"is on vhost '/' .* build it with settings="):
        await mesh_harness.start(stray)
    assert not stray.started


def test_an_unreachable_management_api_fails_in_one_line(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_user="async def test_needs_a_vhost(mesh_settings): pass")
    port = free_port()
    monkeypatch.setenv("MESH_MANAGEMENT_URL", f"http://127.0.0.1:{port}/")
    # -rN: the short summary repeats the message unless the terminal is narrow enough to cut it.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rN")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [f"RabbitMQ?s management API does not answer at http://127.0.0.1:{port} *"]
    )
    assert result.stdout.str().count("does not answer") == 1
    assert "Traceback" not in result.stdout.str()
    assert "plugin.py" not in result.stdout.str()


def test_without_pytest_asyncio_the_fixtures_say_what_is_missing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pytest-asyncio the plugin still loads (a suite that never uses the mesh runs),
    and a mesh_ fixture says what to install."""
    pytester.makepyfile(
        test_user="""
        def test_unrelated():
            pass

        def test_uses_the_mesh(mesh_settings):
            pass
        """
    )
    # A module of that name first on the path that fails to import, as a missing one does.
    shadow = pytester.path / "shadow"
    shadow.mkdir()
    (shadow / "pytest_asyncio.py").write_text("raise ImportError('pytest_asyncio is hidden')")
    monkeypatch.setenv("PYTHONPATH", str(shadow))
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["the mesh_* fixtures need pytest-asyncio: pip install *"])
