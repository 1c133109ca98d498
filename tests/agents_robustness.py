"""Agents that tests/test_robustness.py runs in subprocesses (`mesh run tests.agents_robustness:…`).

They record what they handle in Redis, under the agent's namespace, so the test can see
what a process did even after it was killed.
"""

from __future__ import annotations

import asyncio

from behaviours import SubscriberBehaviour
from mesh import Agent, Message, on

RECORD_TOPIC = "work.item"
SLOW_TOPIC = "slow.item"
HANDLER_SECONDS = 1.0


def processed_key(namespace: str) -> str:
    return f"{namespace}:robustness:processed"


def started_key(namespace: str) -> str:
    return f"{namespace}:robustness:started"


def finished_key(namespace: str) -> str:
    return f"{namespace}:robustness:finished"


class Record(SubscriberBehaviour):
    """Adds each message id to a Redis set."""

    @on(RECORD_TOPIC)
    async def item(self, msg: Message, payload: object) -> None:
        await self.agent.redis.sadd(processed_key(self.agent.settings.namespace), msg.message_id)


class Recorder(Agent):
    behaviours = [Record]


class SlowRecord(SubscriberBehaviour):
    """Takes about a second per message, recording when it started and finished."""

    @on(SLOW_TOPIC)
    async def item(self, msg: Message, payload: object) -> None:
        await self.agent.redis.rpush(started_key(self.agent.settings.namespace), msg.message_id)
        await asyncio.sleep(HANDLER_SECONDS)  # the work a handler does
        await self.agent.redis.rpush(finished_key(self.agent.settings.namespace), msg.message_id)


class SlowRecorder(Agent):
    behaviours = [SlowRecord]
