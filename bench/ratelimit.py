"""Rate-limit decisions per second against a real Redis (``mesh.ratelimit.RateLimiter``).

    python bench/ratelimit.py [--decisions 20000] [--concurrency 16,128,512]

Uses ``MESH_REDIS_URL`` (default the local Redis) and a namespace of its own, deleted at the
end.  20 principals in one role; every decision counts against two buckets: a limit everyone
has on every topic, and each principal's own on its vehicle topics or, for one in five
(alerts), one the role shares.  The limits are high enough that nothing is refused: the
figures are the cost of deciding.

- a single decision loop: one ``take`` at a time (one script call and round trip each);
- ``--concurrency`` tasks taking at once, as the relay's handlers do: batched, the
  decisions asked while a call is out go in the next script call;
- for comparison, the same concurrent load with one script call per decision, pipelined on
  one connection (the replies stage's way): what batching saves.

"cpu" is this process's CPU time per decision (the gateway's share, unaffected by scheduling
noise); the gateway relays a few thousand messages per second.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from mesh.config import Settings
from mesh.ratelimit import LimitSpec, RateLimiter
from mesh.ratelimit.limiter import _TAKE

PRINCIPALS = [f"p{i:02d}" for i in range(20)]
ROLES = ("fleet",)
LIMITS = {
    "own": {"who": "fleet", "topics": "vehicle.#", "rate": "1000000/s", "burst": 1000000},
    "everyone": {"who": "*", "rate": "1000000/s", "burst": 1000000},
    "alerts": {
        "who": "fleet",
        "topics": "alerts.#",
        "rate": "1000000/s",
        "burst": 1000000,
        "shared": True,
    },
}


def question(i: int) -> tuple[str, str]:
    principal = PRINCIPALS[i % len(PRINCIPALS)]
    topic = "alerts.fire" if i % 5 == 0 else f"vehicle.{principal}.speed"
    return principal, topic


class PipelinedCalls:
    """One script call per decision, the calls asked while a pipeline is out sent as the next
    pipeline (as ``mesh.gateway.replies`` sends its commands)."""

    def __init__(self, redis: aioredis.Redis, limiter: RateLimiter) -> None:
        self.redis = redis
        self.limiter = limiter
        self.sha = ""
        self.pending: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self.sender: asyncio.Task[None] | None = None

    async def take(self, principal: str, topic: str) -> bool:
        if not self.sha:
            self.sha = await self.redis.script_load(_TAKE)
        buckets = self.limiter._applicable(principal, ROLES, topic)
        params = [p for b in buckets for p in (b.interval_us, b.capacity_us)]
        steps = [1, len(buckets), *range(1, len(buckets) + 1)]
        command = [
            "EVALSHA",
            self.sha,
            len(buckets),
            *(b.key for b in buckets),
            len(buckets),
            *params,
            *steps,
        ]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append((command, future))
        if self.sender is None:
            self.sender = asyncio.create_task(self.send())
        return int((await future)[0]) == 0

    async def send(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            pipe = self.redis.pipeline(transaction=False)
            for command, _ in batch:
                pipe.execute_command(*command)
            for (_, future), result in zip(batch, await pipe.execute(), strict=True):
                future.set_result(result)
        self.sender = None


async def timed(name: str, count: int, run: Callable[[], Awaitable[int]]) -> None:
    cpu, start = time.process_time(), time.perf_counter()
    allowed = await run()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert allowed == count, f"{count - allowed} of {count} refused"
    print(
        f"  {name:<46} {count / elapsed:8.0f} decisions/s  "
        f"{elapsed / count * 1e6:7.1f} µs each  cpu {cpu / count * 1e6:6.1f} µs"
    )


async def loop(limiter: RateLimiter, count: int) -> int:
    allowed = 0
    for i in range(count):
        principal, topic = question(i)
        allowed += (await limiter.take(principal, ROLES, topic)).allowed
    return allowed


async def concurrent(take: Callable[[int], Awaitable[bool]], count: int, tasks: int) -> int:
    async def worker(first: int) -> int:
        return sum([await take(i) for i in range(first, count, tasks)])

    return sum(await asyncio.gather(*(worker(n) for n in range(tasks))))


async def main(args: argparse.Namespace) -> None:
    url = Settings.from_env().redis_url
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(url)
    limits = {name: LimitSpec.model_validate(spec) for name, spec in LIMITS.items()}
    limiter = RateLimiter(client, namespace, limits)
    pipelined = PipelinedCalls(client, limiter)
    n = args.decisions
    try:
        await loop(limiter, 1000)  # warm-up: connections, the script, the match cache
        print(f"redis {url.rsplit('@', 1)[-1]}; {n} decisions per figure")
        await timed("single decision loop", n, lambda: loop(limiter, n))
        for tasks in args.concurrency:

            async def batched(i: int) -> bool:
                principal, topic = question(i)
                return (await limiter.take(principal, ROLES, topic)).allowed

            async def unbatched(i: int) -> bool:
                return await pipelined.take(*question(i))

            await timed(
                f"{tasks} concurrent, batched (the limiter)",
                n,
                lambda t=tasks: concurrent(batched, n, t),  # type: ignore[misc]
            )
            await timed(
                f"{tasks} concurrent, a script call each, pipelined",
                n,
                lambda t=tasks: concurrent(unbatched, n, t),  # type: ignore[misc]
            )
    finally:
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(t) for t in text.split(",")],
        default=[16, 128, 512],
        help="comma-separated numbers of concurrent takers",
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
