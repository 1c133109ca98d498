"""``idempotent = True``: a behaviour handles each message id once, whatever the broker or a
sender repeats."""

from __future__ import annotations

from agents_reliability import drain, host, subscriber
from helpers import eventually, running, take

from behaviours import SubscriberBehaviour
from mesh import Client, Message, Settings, on
from mesh.gateway import Gateway


class Once(SubscriberBehaviour):
    idempotent = True
    retry_delays = (0.05,)

    @on("pay.*")
    async def pay(self, msg: Message, payload: dict[str, object]) -> None:
        agent = host(self)
        agent.seen.put_nowait(("once", msg.message_id, payload.get("n")))
        if payload.get("fail_first") and msg.attempt == 1:
            raise RuntimeError("first attempt fails")
        if payload.get("hold"):
            await agent.release.wait()


class Every(SubscriberBehaviour):
    @on("pay.*")
    async def pay(self, msg: Message, payload: dict[str, object]) -> None:
        host(self).seen.put_nowait(("every", msg.message_id, payload.get("n")))


async def send_twice(client: Client, message_id: str, payload: dict[str, object]) -> None:
    for n in (1, 2):
        message = client._message("pay.in", payload | {"n": n}, message_id=message_id)
        await client.send(message, "pay.in")


async def test_a_repeated_message_id_is_handled_once(settings: Settings) -> None:
    once = subscriber(settings, Once, agent_id="once")
    every = subscriber(settings, Every, agent_id="every")
    client = Client(settings=settings)
    async with running(Gateway(settings=settings), once, every, client):
        await send_twice(client, "pay-1", {})
        assert [s[2] for s in await take(every.seen, 2)] == [1, 2]
        # A later message proves the second copy was settled before it (one queue, in order).
        await client.publish("pay.in", {"n": 3})
        assert [s[2] for s in await take(once.seen, 2)] == [1, 3]
    assert drain(once.seen) == []


async def test_a_failed_attempt_does_not_count_as_handled(settings: Settings) -> None:
    once = subscriber(settings, Once, agent_id="once")
    client = Client(settings=settings)
    async with running(Gateway(settings=settings), once, client):
        message_id = await client.publish("pay.in", {"fail_first": True})
        # Attempt 1 fails and gives its claim up, so the retry runs the handler again.
        assert await take(once.seen, 2) == [("once", message_id, None)] * 2
        # Handled now: copies sent afterwards are skipped, and a new message is not.
        await send_twice(client, message_id, {})
        await client.publish("pay.in", {"n": 9})
        assert [s[2] for s in await take(once.seen, 1)] == [9]
    assert drain(once.seen) == []


class OneAtATime(Once):
    """Prefetch 1: while one instance holds a copy, the broker gives the next to the other."""

    name = "once"
    mailbox_size = 1


async def test_two_deliveries_at_once_run_the_handler_once(settings: Settings) -> None:
    """Two instances share the queue; while one handles the message, the other's copy is
    deferred (again and again, while the first holds it), and skipped once it was handled."""
    first = subscriber(settings, OneAtATime, agent_id="once", instance="a")
    second = subscriber(settings, OneAtATime, agent_id="once", instance="b")
    client = Client(settings=settings)

    def settled(outcome: str) -> float:
        return sum(
            agent.metrics.registry.get_sample_value(
                "mesh_messages_total", {"behaviour": OneAtATime.name, "outcome": outcome}
            )
            or 0.0
            for agent in (first, second)
        )

    async with running(Gateway(settings=settings), first, second, client):
        await send_twice(client, "pay-2", {"hold": True})
        # One copy is in the handler, held; the other was delivered and put off meanwhile.
        await eventually(lambda: settled("deferred") >= 2)
        assert [s[1] for s in drain(first.seen) + drain(second.seen)] == ["pay-2"]
        first.release.set()
        second.release.set()
        await eventually(lambda: settled("skipped") == 1)
        await client.publish("pay.in", {"n": 3})
        later = await eventually(lambda: drain(first.seen) + drain(second.seen))
        assert [s[2] for s in later] == [3]
    assert drain(first.seen) + drain(second.seen) == []
    assert settled("handled") == 2  # pay-2 once, and the later message

