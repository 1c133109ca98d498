"""The agent tests/test_health.py runs as ``mesh run tests.agents_health:Drained`` (and in its
own event loop, to finish what the process left).

It records in Redis, under the agent's namespace, each message it starts and finishes, so
the test sees what the process did after it exited.  The handler of message ``GATE`` waits
until the test sets the release key: a handler surely in flight when SIGTERM comes.
"""

from __future__ import annotations

import asyncio

from behaviours import SubscriberBehaviour
from mesh import Agent, Message, on

TOPIC = "drain.item"
GATE = 30


def started_key(namespace: str) -> str:
    return f"{namespace}:health:started"


def finished_key(namespace: str) -> str:
    return f"{namespace}:health:finished"


def release_key(namespace: str) -> str:
    return f"{namespace}:health:release"


class Work(SubscriberBehaviour):
    max_concurrency = 4

    @on(TOPIC)
    async def item(self, msg: Message, payload: dict[str, int]) -> None:
        redis, namespace = self.agent.redis, self.agent.settings.namespace
        await redis.rpush(started_key(namespace), msg.message_id)
        if payload["n"] == GATE:
            while not await redis.exists(release_key(namespace)):  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # the test, another process, releases it in Redis
        else:
            await asyncio.sleep(0.01)  # the work a handler does
        await redis.rpush(finished_key(namespace), msg.message_id)


class Drained(Agent):
    behaviours = [Work]
