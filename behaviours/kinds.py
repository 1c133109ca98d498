"""The behaviour kinds: what a behaviour does besides serving its ``@on`` handlers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import ClassVar

from mesh.behaviour import Behaviour


class CyclicBehaviour(Behaviour):
    """Calls :meth:`run` over and over until stopped or killed."""

    kind = "cyclic"

    async def run(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define run()")

    async def main(self) -> int | None:
        while True:
            await self.run()
            # Yield even when run() never awaits, so one behaviour cannot starve the rest.
            await asyncio.sleep(0)


class OneShotBehaviour(Behaviour):
    """Calls :meth:`run` once; its return value is the exit code."""

    kind = "oneshot"

    async def run(self) -> int | None:
        raise NotImplementedError(f"{type(self).__name__} must define run()")

    async def main(self) -> int | None:
        return await self.run()


class PeriodicBehaviour(Behaviour):
    """Calls :meth:`tick` every ``period`` seconds (first after ``delay``).

    Ticks keep a fixed rate: a slow tick delays the next, it does not shift the schedule.
    """

    kind = "periodic"
    period: ClassVar[float] = 1.0
    delay: ClassVar[float] = 0.0

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.period <= 0:
            raise ValueError(f"{cls.__name__}.period must be positive")

    async def tick(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define tick()")

    async def main(self) -> int | None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.delay
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self.tick()
            due = max(due + self.period, loop.time())


class TimeoutBehaviour(Behaviour):
    """Calls :meth:`run` once, at ``at`` (a datetime) or after ``delay`` seconds."""

    kind = "timeout"
    delay: ClassVar[float] = 0.0
    at: ClassVar[datetime | None] = None

    async def run(self) -> int | None:
        raise NotImplementedError(f"{type(self).__name__} must define run()")

    async def main(self) -> int | None:
        wait = self.delay
        if self.at is not None:
            at = self.at if self.at.tzinfo else self.at.replace(tzinfo=UTC)
            wait = (at - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(0.0, wait))
        return await self.run()


class SubscriberBehaviour(Behaviour):
    """Only ``@on`` handlers: lives until stopped."""

    kind = "subscriber"
