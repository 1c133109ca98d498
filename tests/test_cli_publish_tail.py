"""``mesh publish`` and ``mesh tail`` as a shell runs them, against the test's vhost."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
from agents_registry import ROOT, mesh_env
from agents_reliability import Service, vhost_of
from helpers import eventually, free_port, running, take

from mesh import Client, Settings, topology
from mesh.cli.tail import MAX_LENGTH
from mesh.devservices import BrokerAdmin
from mesh.envelope import encode_body
from mesh.gateway import Gateway

TIME = r"\d\d:\d\d:\d\d\.\d{3}"


async def mesh(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> tuple[int, str, str]:
    """Run ``mesh <args>`` in ``env`` (feeding it ``stdin``); exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.cli", *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate(None if stdin is None else stdin.encode())
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def nowhere() -> dict[str, str]:
    """An environment that points ``mesh`` at a port nothing listens on."""
    return {**os.environ, "MESH_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}


def refused(code: int, err: str, reason: str) -> None:
    """Assert a command failed with exactly one error line, containing ``reason``."""
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert reason in errors[0], err


@dataclass
class Tail:
    process: asyncio.subprocess.Process
    queue: str

    async def finish(self) -> tuple[int, str, str]:
        """Wait for the tail to end by itself; its exit code, stdout and the rest of stderr."""
        async with asyncio.timeout(60):
            out, err = await self.process.communicate()
        assert self.process.returncode is not None
        return self.process.returncode, out.decode(), err.decode()


@asynccontextmanager
async def tailing(settings: Settings, *args: str) -> AsyncIterator[Tail]:
    """``mesh tail <args>``, from the moment its queue is bound and consumed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.cli", "tail", *args,
        cwd=ROOT,
        env=mesh_env(settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        async with asyncio.timeout(30):
            ready = (await process.stderr.readline()).decode()
        found = re.search(r"on queue (\S+)", ready)
        assert found, f"tail did not start: {ready}"
        yield Tail(process, found[1])
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def broker_user(settings: Settings) -> str:
    return unquote(urlsplit(settings.amqp_url).username or "guest")


async def test_publish_reaches_a_subscriber_with_payload_and_headers(settings: Settings) -> None:
    """The id printed is the id of the message a subscriber gets, with payload and headers."""
    service = Service("svc", settings=settings)
    env = mesh_env(settings)
    async with running(Gateway(settings=settings), service):
        code, out, err = await mesh(
            env, "publish", "news.flash", '{"text": "hello", "n": 1}',
            "--header", "source=cli", "--header", "lang=en",
        )
        assert code == 0, err
        (message,) = await take(service.seen, 1)
    assert out.strip() == message.message_id
    assert message.topic == "news.flash"
    assert message.payload == {"text": "hello", "n": 1}
    assert message.headers == {"source": "cli", "lang": "en"}
    assert message.user_id == broker_user(settings)


async def test_publish_from_stdin_and_jsonl(settings: Settings) -> None:
    """``-`` publishes stdin as one message; ``--jsonl`` one per non-blank line, in order,
    and stops at a line that is not JSON, naming it, after publishing the lines before."""
    service = Service("svc", settings=settings)
    env = mesh_env(settings)
    async with running(Gateway(settings=settings), service):
        code, out, err = await mesh(env, "publish", "news.stdin", "-", stdin='{"a": [1]}\n')
        assert code == 0, err
        (single,) = await take(service.seen, 1)
        assert (out.strip(), single.topic, single.payload) == (
            single.message_id, "news.stdin", {"a": [1]}
        )

        code, out, err = await mesh(
            env, "publish", "news.lines", "--jsonl", stdin='{"n": 1}\n\n{"n": 2}\n[3]\n'
        )
        assert code == 0, err
        received = {m.message_id: m.payload for m in await take(service.seen, 3)}
        assert [received[i] for i in out.split()] == [{"n": 1}, {"n": 2}, [3]]

        code, out, err = await mesh(
            env, "publish", "news.lines", "--jsonl", stdin='{"n": 4}\nnot json\n{"n": 5}\n'
        )
        refused(code, err, "line 2 is not JSON")
        (fourth,) = await take(service.seen, 1)
        assert (out.split(), fourth.payload) == ([fourth.message_id], {"n": 4})
        # Nothing after the bad line went out: the next message is this marker.
        code, marker, err = await mesh(env, "publish", "news.marker")
        assert code == 0, err
        (after,) = await take(service.seen, 1)
        assert (after.message_id, after.payload) == (marker.strip(), {})


async def test_publish_refuses_bad_input_in_one_line() -> None:
    """Bad JSON, mesh topics and bad headers are refused before any connection."""
    env = nowhere()
    code, _, err = await mesh(env, "publish", "news.flash", "{not json")
    refused(code, err, "payload is not JSON")
    code, _, err = await mesh(env, "publish", "_req.v7.status", "{}")
    refused(code, err, "invalid topic '_req.v7.status'")
    code, _, err = await mesh(env, "publish", "news.#", "{}")
    refused(code, err, "invalid topic 'news.#'")
    code, _, err = await mesh(env, "publish", "news.x", "-", stdin="")
    refused(code, err, "payload is not JSON")
    code, _, err = await mesh(env, "publish", "news.x", "--header", "novalue")
    refused(code, err, "'novalue' is not KEY=VALUE")
    code, _, err = await mesh(env, "publish", "news.x", "--header", "x-mesh-user=root")
    refused(code, err, "'x-mesh-user' is set by the mesh")
    code, _, err = await mesh(env, "publish", "news.x", "{}", "--jsonl")
    refused(code, err, "--jsonl reads the payloads from stdin")


async def test_tail_json_shows_a_matching_message_published_meanwhile(
    settings: Settings,
) -> None:
    """``--json --count 1`` prints the one matching message with its envelope, then exits 0."""
    publisher = Client("pub", settings=settings)
    async with (
        running(Gateway(settings=settings), publisher),
        tailing(settings, "news.*", "--json", "--count", "1", "--timeout", "30") as tail,
    ):
            await publisher.publish("other.topic", {"skip": True})
            message_id = await publisher.publish(
                "news.flash", {"text": "hi"}, headers={"source": "test"}
            )
            code, out, err = await tail.finish()
    assert code == 0, err
    (line,) = out.splitlines()
    shown = json.loads(line)
    assert datetime.fromisoformat(shown.pop("time")).tzinfo is not None
    assert shown == {
        "topic": "news.flash",
        "sender": "pub",
        "instance": publisher.instance,
        "user": broker_user(settings),
        "message_id": message_id,
        "type": "event",
        "size": len(encode_body({"text": "hi"})),
        "headers": {"source": "test"},
        "payload": {"text": "hi"},
    }


async def test_tail_lines_show_sender_size_payload_and_foreign_messages(
    settings: Settings,
) -> None:
    """One line per message; a message that is not a mesh message is shown with the reason."""
    publisher = Client("pub", settings=settings)
    async with (
        running(Gateway(settings=settings), publisher),
        tailing(settings, "--payload", "--count", "2", "--timeout", "30") as tail,
    ):
            # Straight to mesh.topic, past the gateway, as only a misconfigured broker allows.
            connection = await aio_pika.connect(settings.amqp_url)
            async with connection:
                channel = await connection.channel()
                exchange = await channel.get_exchange(topology.TOPIC_EXCHANGE)
                await exchange.publish(aio_pika.Message(b"raw bytes"), "news.raw")
            await publisher.publish("news.flash", {"text": "hi"})
            code, out, err = await tail.finish()
    assert code == 0, err
    foreign, mesh_line = out.splitlines()
    assert re.fullmatch(
        TIME + r"  news\.raw  \(not a mesh message: body is not JSON: .*\)  9 B  raw bytes",
        foreign,
    ), foreign
    user = re.escape(broker_user(settings))
    assert re.fullmatch(
        TIME + rf"  news\.flash  pub/{publisher.instance} \(user {user}\)  13 B  "
        + re.escape('{"text": "hi"}'),
        mesh_line,
    ), mesh_line


async def test_tail_refuses_mesh_patterns() -> None:
    """Patterns of the mesh's own traffic are refused in one line, before any connection."""
    code, _, err = await mesh(nowhere(), "tail", "news.#", "_req.#")
    refused(code, err, "invalid pattern '_req.#'")


async def test_tail_counts_short_when_nothing_comes_in_time(settings: Settings) -> None:
    """``--count`` with ``--timeout``: exit 1 naming how many came."""
    async with tailing(settings, "--count", "1", "--timeout", "0.5") as tail:
        code, out, err = await tail.finish()
    assert out == ""
    refused(code, err, "0 of 1 shown")


async def test_tail_queue_is_bounded_and_goes_with_ctrl_c(
    settings: Settings, admin: BrokerAdmin
) -> None:
    """The tail's queue keeps at most MAX_LENGTH (oldest dropped, nothing dead-lettered);
    Ctrl+C ends the tail with exit 0, no traceback, and the queue is deleted."""

    async def queues() -> dict[str, dict[str, Any]]:
        out = await admin.ctl(
            "-q", "list_queues", "-p", vhost_of(settings),
            "name", "arguments", "exclusive", "auto_delete", "--formatter", "json",
        )
        return {row["name"]: row for row in json.loads(out)}

    async with tailing(settings, "news.#") as tail:
        row = (await queues())[tail.queue]
        # rabbitmqctl lists each argument as [name, type, value].
        assert {name: value for name, _, value in row["arguments"]} == {
            "x-queue-type": "classic",
            "x-max-length": MAX_LENGTH,
            "x-overflow": "drop-head",
        }
        assert (row["exclusive"], row["auto_delete"]) == (True, True)
        tail.process.send_signal(signal.SIGINT)
        code, _, err = await tail.finish()
    assert code == 0, err
    assert "Traceback" not in err
    assert "Aborted" not in err

    async def gone() -> bool:
        return tail.queue not in await queues()

    await eventually(gone)
