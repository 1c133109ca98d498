"""The gateway's relay when the broker closes its connections mid-stream (issue 8, 3a).

A delivery whose channel closed is not relayed (the broker requeued it, and its next delivery
is relayed); a copy confirmed before the close whose ack was lost with the channel is the one
duplicate left, reported once per channel; and no log line claims a dead letter that was not
sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter

import pytest
from agents_reliability import Host, counts_are, host, mesh_id, peek, subscriber, vhost_of
from aio_pika.abc import AbstractIncomingMessage
from helpers import eventually, running
from proxy import Proxy

from behaviours import SubscriberBehaviour
from mesh import Message, Settings, on, topology
from mesh.connection import connect
from mesh.devservices import BrokerAdmin
from mesh.envelope import H_REASON
from mesh.gateway import Gateway, Passage, default_stages
from mesh.gateway.relay import Relay
from mesh.transport import Transport, is_stale

TOPIC = "stream.item"
WINDOW = Relay.mailbox_size  # deliveries the relay holds at once (its prefetch)
RELAY_LOGGER = "mesh.gateway.relay"
UNACKED = re.compile(r"^(\d+) relayed messages from (\S+) could not be acked")
RETURNED = re.compile(r"^(\d+) messages from (\S+) were not relayed")


class Record(SubscriberBehaviour):
    """Puts the sender's id of every ``stream.item`` copy on its agent's ``seen``."""

    max_concurrency = 64

    @on(TOPIC)
    async def item(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg.message_id)


class Gate:
    """A pipeline stage that holds every ``stream.item`` until ``open`` is set."""

    name = "gate"

    def __init__(self) -> None:
        self.held: list[AbstractIncomingMessage] = []
        self.open = asyncio.Event()

    async def __call__(self, passage: Passage) -> None:
        if passage.routing_key == TOPIC:
            self.held.append(passage.incoming)
            await self.open.wait()


class Seen:
    """What a ``Record`` subscriber has seen so far."""

    def __init__(self, agent: Host) -> None:
        self.agent = agent
        self.ids: list[str] = []

    def count(self) -> int:
        while not self.agent.seen.empty():
            self.ids.append(self.agent.seen.get_nowait())
        return len(self.ids)

    def duplicates(self) -> int:
        self.count()
        return len(self.ids) - len(set(self.ids))


async def gateway_connections(
    admin: BrokerAdmin, settings: Settings, gateway: Gateway
) -> dict[str, str]:
    """The broker's pid of each of the gateway's connections, by connection name."""
    out = await admin.ctl(
        "-q", "list_connections", "name", "vhost", "client_properties", "--formatter", "json"
    )
    prefix = f"{gateway.id}/{gateway.instance}"
    names = {}
    for row in json.loads(out):
        for key, _, value in row["client_properties"]:
            if key == "connection_name" and str(value).startswith(prefix):
                names[row["name"]] = str(value)
    return {
        names[c.name]: c.pid
        for c in await admin.list_connections(vhost_of(settings))
        if c.name in names
    }


async def close_broker_side(
    admin: BrokerAdmin, settings: Settings, gateway: Gateway, *, publishing: bool
) -> None:
    """Close the gateway's consuming connection (and its publishing one) from the broker."""
    pids = await gateway_connections(admin, settings, gateway)
    consuming = f"{gateway.id}/{gateway.instance}"
    closing = [consuming, f"{consuming} publishing"] if publishing else [consuming]
    await asyncio.gather(
        *(admin.ctl("close_connection", pids[name], "closed by test") for name in closing)
    )


def publishing_through(transport: Transport, url: str) -> None:
    """Make ``transport`` open its publishing connection to ``url`` (a proxy); its
    consuming connection still goes straight to the broker."""
    direct = transport._connect

    async def _connect(name: str):  # type: ignore[no-untyped-def]
        if not name.endswith(" publishing"):
            return await direct(name)
        return await connect(
            url, name, where="proxy", vhost="-", user=transport.user, wait=10.0
        )

    transport._connect = _connect  # type: ignore[method-assign]


def relay_lines(caplog: pytest.LogCaptureFixture, pattern: re.Pattern[str]) -> list[int]:
    """The counts in the relay's summary lines matching ``pattern`` for ``mesh.gateway``."""
    found = []
    for record in caplog.records:
        match = pattern.match(record.getMessage()) if record.name == RELAY_LOGGER else None
        if match and match.group(2) == topology.GATEWAY_QUEUE:
            found.append(int(match.group(1)))
    return found


def dead_letter_claims(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Relay log lines that say a message is being or was dead-lettered (not those that
    say dead-lettering it failed: "and so did dead-lettering it")."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == RELAY_LOGGER
        and re.search(r"(?<!so did )dead-letter(ing|ed) it", r.getMessage())
    ]


async def test_deliveries_of_a_closed_channel_are_not_relayed(
    settings: Settings, admin: BrokerAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    """A full window (512 deliveries held in the pipeline) when the broker closes both of the
    gateway's connections: none of them is relayed, their redeliveries are, so each message
    arrives exactly once (before the fix: 512 duplicates), and the relay says so in one line."""
    caplog.set_level(logging.INFO, logger=RELAY_LOGGER)
    gate = Gate()
    gateway = Gateway(settings=settings, stages=[*default_stages(), gate])
    sub = subscriber(settings, Record)
    pub = Host("pub", settings=settings)
    seen = Seen(sub)
    total = WINDOW + 88  # some wait in the queue behind the full window
    async with running(gateway, sub, pub), peek(settings) as broker:
        sent = await asyncio.gather(*(pub.publish(TOPIC, {"n": n}) for n in range(total)))
        await eventually(lambda: len(gate.held) == WINDOW)
        await close_broker_side(admin, settings, gateway, publishing=True)
        # Once the gateway saw the close, let the held deliveries (and the redeliveries)
        # go on: none of the held ones may be relayed now.
        await eventually(lambda: all(is_stale(incoming) for incoming in gate.held))
        gate.open.set()
        await eventually(lambda: seen.count() >= total and set(seen.ids) >= set(sent))
        # Everything relayed and acked, every copy handled: no duplicate is still on its way.
        await eventually(
            lambda: counts_are(admin, settings, topology.GATEWAY_QUEUE, ready=0, unacked=0)
        )
        queue = topology.behaviour_queue(sub.id, Record.name)
        await eventually(lambda: counts_are(admin, settings, queue, ready=0, unacked=0))
        dead = await broker.dead_letters_through_marker()
    assert seen.duplicates() == 0, Counter(seen.ids).most_common(3)
    assert relay_lines(caplog, UNACKED) == []
    assert relay_lines(caplog, RETURNED) == [WINDOW]
    assert dead_letter_claims(caplog) == []
    assert dead == []


async def test_a_copy_confirmed_after_the_close_is_the_only_duplicate_and_reported_once(
    settings: Settings, admin: BrokerAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    """Copies sent before the consuming connection closes and confirmed after it cannot be
    acked: the broker redelivers their originals and subscribers get them twice. Those are
    all the duplicates there are, and the relay reports them in one line, not one per message."""
    caplog.set_level(logging.INFO, logger=RELAY_LOGGER)
    count = 50
    async with Proxy.for_url(settings.amqp_url) as proxy:
        gateway = Gateway(settings=settings)
        publishing_through(gateway.transport, proxy.url_for(settings.amqp_url))
        sub = subscriber(settings, Record)
        pub = Host("pub", settings=settings)
        seen = Seen(sub)
        async with running(gateway, sub, pub):
            # The broker routes the gateway's copies at once, but its confirms are held.
            proxy.delay_replies(60)
            sent = await asyncio.gather(*(pub.publish(TOPIC, {"n": n}) for n in range(count)))
            await eventually(lambda: seen.count() == count)
            await close_broker_side(admin, settings, gateway, publishing=False)
            # Redelivered on the new channel and relayed again (those confirms held too).
            await eventually(lambda: seen.count() == 2 * count)
            proxy.delay_replies(0)
            await eventually(
                lambda: counts_are(admin, settings, topology.GATEWAY_QUEUE, ready=0, unacked=0)
            )
            await eventually(lambda: relay_lines(caplog, UNACKED))
    assert Counter(seen.ids) == Counter({message_id: 2 for message_id in sent})
    # The first copies' acks were lost with the channel: reported once, with their number.
    assert relay_lines(caplog, UNACKED) == [count]
    assert relay_lines(caplog, RETURNED) == []
    assert dead_letter_claims(caplog) == []


async def test_a_dead_letter_is_claimed_only_once_sent(
    settings: Settings, admin: BrokerAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay cannot publish a copy (no write permission on mesh.topic) nor a dead letter
    (none on mesh.dlx): it logs that dead-lettering failed and that it rejected the message,
    never that it dead-lettered it; the only dead letter is the broker's, for the reject."""
    caplog.set_level(logging.INFO, logger=RELAY_LOGGER)
    vhost = vhost_of(settings)
    sub = subscriber(settings, Record)
    pub = Host("pub", settings=settings)
    gateway = Gateway(settings=settings)
    user = gateway.transport.user  # every agent here, and the test, are this user
    async with running(gateway, sub, pub), peek(settings) as broker:
        # Write anywhere but to mesh.topic and mesh.dlx (rabbitmqctl arguments may not
        # hold a backslash or a dollar sign: "." and a prefix match are close enough).
        await admin.ctl(
            "-q", "set_permissions", "-p", vhost, user, ".*", "^(?!mesh.(topic|dlx)).*", ".*"
        )
        try:
            message_id = await pub.publish(TOPIC, {"n": 1})
            await eventually(lambda: "so did dead-lettering it" in caplog.text)
        finally:
            await admin.ctl("-q", "set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        dead = await broker.dead_letters_through_marker()
    assert dead_letter_claims(caplog) == []
    [failure] = [r for r in caplog.records if "so did dead-lettering it" in r.getMessage()]
    assert message_id in failure.getMessage()
    assert "rejected it" in failure.getMessage()
    # What mesh.dead holds is the broker's dead letter for the reject, not the relay's.
    assert [mesh_id(d) for d in dead] == [message_id]
    assert "gateway relay failed" not in str(dead[0].headers.get(H_REASON))
    assert seen_nothing(sub)


def seen_nothing(agent: Host) -> bool:
    return agent.seen.empty()
