"""A message whose AMQP short strings are not UTF-8 must not cut the gateway off the broker.

pamqp decodes short strings (``app_id``, ``message_id``, header names) as strict UTF-8 and its
error would end the consumer's whole connection, at every redelivery; ``mesh.shortstr`` makes it
decode them with replacement characters, and the decode stage refuses a sender that is no agent
id.
"""

from __future__ import annotations

import asyncio

import aiormq
from agents_reliability import Host, host, peek, subscriber
from helpers import WireBytes, decision_of, running

from behaviours import SubscriberBehaviour
from mesh import Message, Settings, on, topology
from mesh.gateway import Gateway


class Watch(SubscriberBehaviour):
    @on("poison.#")
    async def seen(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


async def test_an_undecodable_sender_id_is_refused_and_the_gateway_stays_connected(
    settings: Settings,
) -> None:
    gateway = Gateway(settings=settings)
    watcher: Host = subscriber(settings, Watch, agent_id="watcher")
    async with running(gateway, watcher), peek(settings) as broker:
        # Through aiormq itself: aio-pika turns properties into plain str on the way.
        channel = await broker.connection.channel()
        underlay = await channel.get_underlay_channel()
        await underlay.basic_publish(
            b"{}",
            exchange=topology.POLICY_EXCHANGE,
            routing_key="poison.topic",
            properties=aiormq.spec.Basic.Properties(
                app_id=WireBytes(b"\xffpub"),  # octets an AMQP short string may hold
                message_id="poison-1",
                user_id="guest",
                content_type="application/json",
            ),
        )
        record = await decision_of(settings, "poison-1")
        assert (record.decision, record.stage) == ("denied", "decode")
        assert record.reason == "app_id is no agent id (letters, digits, '-', '_')"

        sent = await watcher.publish("poison.fine", {"ok": True})
        delivered = await asyncio.wait_for(watcher.seen.get(), 15)
        assert (delivered.message_id, delivered.payload) == (sent, {"ok": True})
        assert watcher.seen.empty()  # the poisoned one never reached a subscriber
