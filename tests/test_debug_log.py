"""At log level DEBUG (``mesh run --log-level debug``) each message handled is one line:
behaviour, topic, id, outcome and duration."""

from __future__ import annotations

import logging
import re

import pytest
from agents_reliability import host, subscriber
from helpers import eventually, running, take

from behaviours import SubscriberBehaviour
from mesh import Client, Message, Settings, on
from mesh.gateway import Gateway


class Audited(SubscriberBehaviour):
    retry_delays = (0.05,)

    @on("job.*")
    async def job(self, msg: Message, payload: dict[str, bool]) -> None:
        host(self).seen.put_nowait(msg.attempt)
        if payload.get("fail") and msg.attempt == 1:
            raise ValueError("not yet")


async def test_each_message_handled_is_logged_at_debug(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mesh.behaviour")
    worker = subscriber(settings, Audited, agent_id="worker")
    client = Client(settings=settings)
    async with running(Gateway(settings=settings), worker, client):
        fine = await client.publish("job.ok", {})
        flaky = await client.publish("job.flaky", {"fail": True})
        await take(worker.seen, 3)

        def lines(message_id: str) -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.DEBUG and message_id in r.getMessage()
            ]

        await eventually(lambda: len(lines(flaky)) == 2)
    [ok] = lines(fine)
    assert re.fullmatch(rf"audited job\.ok {fine}: handled in \d+\.\d ms", ok)
    retried, handled = lines(flaky)
    assert re.fullmatch(
        rf"audited job\.flaky {flaky}: failed \(ValueError\), retry 2 in 0\.05s in \d+\.\d ms",
        retried,
    )
    assert handled.startswith(f"audited job.flaky {flaky}: handled in ")
