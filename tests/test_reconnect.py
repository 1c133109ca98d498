"""Reconnecting while the broker still holds the old, half-open connection."""

from __future__ import annotations

import json
import logging
import time

import pytest
from agents_reliability import Host, consumers, host, vhost_of
from helpers import eventually, running
from proxy import Proxy

from behaviours import SubscriberBehaviour
from mesh import Agent, Message, RequestTimeout, Settings, on, rpc, topology
from mesh.connection import FIRST_RETRY, BackoffConnection
from mesh.devservices import BrokerAdmin
from mesh.gateway import Gateway


class Everyone(SubscriberBehaviour):
    broadcast = True

    @on("everyone.item")
    async def item(self, msg: Message, payload: dict[str, int]) -> None:
        host(self).seen.put_nowait(payload["n"])


class Status(Host):
    behaviours = [Everyone]

    @rpc("status")
    async def status(self, msg: Message, payload: object) -> dict[str, str]:
        return {"instance": self.instance}


async def connections_named(admin: BrokerAdmin, settings: Settings, name: str) -> int:
    """How many connections the broker holds on the test's vhost with client name ``name``."""
    out = await admin.ctl(
        "-q", "list_connections", "vhost", "client_properties", "--formatter", "json"
    )
    return sum(
        1
        for row in json.loads(out)
        if row["vhost"] == vhost_of(settings)
        and ["connection_name", "longstr", name] in row["client_properties"]
    )


async def consumers_are(admin: BrokerAdmin, settings: Settings, queue: str, count: int) -> bool:
    return await consumers(admin, settings, queue) == count


async def answered_within(caller: Agent, agent: str, seconds: float) -> object:
    """The first answer of ``agent`` to ``status``, asking again until ``seconds`` passed."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await caller.request(agent, "status", {}, timeout=1)
        except RequestTimeout:
            if time.monotonic() >= deadline:
                raise


async def test_agent_reconnects_while_the_broker_holds_its_old_connection(
    settings: Settings, admin: BrokerAdmin
) -> None:
    """After its network drops, an agent is back within seconds, long before the broker
    notices the old connection is dead (its heartbeat timeout is a minute): neither its
    exclusive inbox nor its broadcast queue is held by the old connection."""
    async with Proxy.for_url(settings.amqp_url) as proxy:
        behind = settings.model_copy(update={"amqp_url": proxy.url_for(settings.amqp_url)})
        agent = Status("st", settings=behind, instance="s1")
        caller = Agent("caller", settings=settings)
        async with running(Gateway(settings=settings), agent, caller):
            assert await caller.request("st", "status", {}) == {"instance": "s1"}
            proxy.drop_clients()
            assert await answered_within(caller, "st", 20) == {"instance": "s1"}
            # The old connection is still open on the broker's side: the case at hand.
            assert await connections_named(admin, settings, "st/s1") == 2
            # The broadcast queue took the new consumer beside the old one; the old one's
            # unacked messages return to the queue when the broker drops it.
            queue = topology.broadcast_queue("st", "s1", Everyone.name)
            await eventually(lambda: consumers_are(admin, settings, queue, 2))


async def test_an_outage_is_logged_once_and_reconnects_back_off(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """While the broker is away an agent logs the outage once and its recovery once, not a
    line per attempt; the wait between attempts grows with the outage."""
    caplog.set_level(logging.INFO)
    async with Proxy.for_url(settings.amqp_url) as proxy:
        behind = settings.model_copy(update={"amqp_url": proxy.url_for(settings.amqp_url)})
        agent = Status("st", settings=behind, instance="s1")
        caller = Agent("caller", settings=settings)
        async with running(Gateway(settings=settings), agent, caller):
            connection = agent.transport.connection
            assert isinstance(connection, BackoffConnection)
            assert connection.reconnect_interval == FIRST_RETRY
            proxy.refuse_clients()
            proxy.drop_clients()
            await eventually(lambda: connection.reconnect_interval > FIRST_RETRY, timeout=20)
            proxy.accept_clients()
            assert await answered_within(caller, "st", 30) == {"instance": "s1"}
    texts = [str(r.msg) for r in caplog.records]  # templates: some records' args do not format
    lost = [t for t in texts if t.startswith("lost the connection to RabbitMQ")]
    back = [t for t in texts if t.startswith("reconnected to RabbitMQ after")]
    assert len(lost) == len(back) == 2  # the agent's two connections
    assert not [t for t in texts if "Reconnecting after" in t or "Connection attempt to" in t]
