"""Rate limits: token buckets in Redis shared by gateway replicas (``mesh.ratelimit``), and
the gateway's rate-limit stage (``mesh.gateway.ratelimit``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage
from helpers import eventually, free_port
from pydantic import ValidationError

from mesh.config import Settings
from mesh.devservices import Services
from mesh.gateway.pipeline import Denied, Passage, Unavailable
from mesh.gateway.ratelimit import RateLimit, RateLimited
from mesh.policy import parse_policy
from mesh.ratelimit import LimitSpec, RateLimiter, RateLimitUnavailable, Verdict, parse_rate


def limits(**specs: dict[str, Any]) -> dict[str, LimitSpec]:
    return {name: LimitSpec.model_validate(spec) for name, spec in specs.items()}


@pytest.fixture
def redis_url(services: Services) -> str:
    return services.settings.redis_url


async def burst_of(
    limiter: RateLimiter, count: int, principal: str = "vehicles", topic: str = "vehicle.v1.x"
) -> list[Verdict]:
    """``count`` decisions asked at once (so they go in one script call, at one time)."""
    return list(
        await asyncio.gather(*(limiter.take(principal, (), topic) for _ in range(count)))
    )


# --- the spec ------------------------------------------------------------------------------


def test_rates_and_defaults() -> None:
    assert parse_rate("100/s") == 100
    assert parse_rate("6000/min") == 100
    assert parse_rate("36/h") == 0.01
    assert parse_rate("0.5/s") == 0.5
    spec = LimitSpec.model_validate({"who": "vehicles", "rate": "6000/min"})
    assert spec.who == ["vehicles"]
    assert spec.topics == ["#"]
    assert spec.capacity == 100  # one second's worth
    assert LimitSpec.model_validate({"who": "*", "rate": "10/h"}).capacity == 1
    assert not spec.shared
    assert spec.describe() == "6000/min for vehicles on #"
    shared = LimitSpec.model_validate(
        {"who": ["fleet", "*"], "topics": ["a.#", "b.*"], "rate": "5/s", "shared": True}
    )
    assert shared.describe() == "5/s shared by fleet, everyone on a.#, b.*"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"who": "v", "rate": "100/sec"}, r"rate '100/sec' is not COUNT/UNIT with UNIT one of "),
        ({"who": "v", "rate": "fast"}, r"rate 'fast' is not COUNT/UNIT"),
        ({"who": "v", "rate": "0/s"}, r"rate '0/s' must be more than 0"),
        ({"who": "v", "rate": 100}, r"rate 100 needs a unit: 100/s"),
        ({"who": "v", "rate": "1/s", "burst": 0}, r"burst 0 must be at least 1"),
        ({"who": "v", "rate": "1/s", "burst": "5"}, r"burst\n  Input should be a valid int"),
        ({"who": [], "rate": "1/s"}, r"who: names nobody"),
        ({"who": "v", "rate": "1/s", "topics": []}, r"topics: names no pattern"),
        ({"who": "v", "rate": "1/s", "topics": "_req.#"}, r"routing keys starting with '_'"),
        ({"who": "v", "rate": "1/s", "topics": "vehicle.{self}"}, r"word '\{self\}' must be"),
        ({"who": "v", "rate": "1/s", "burts": 3}, r"unknown key 'burts' \(expected who, topics,"),
        ({"who": "v"}, r"rate\n  Field required"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LimitSpec.model_validate(spec)


# --- bucket math ---------------------------------------------------------------------------


async def test_a_burst_passes_then_the_next_waits_one_interval(
    redis: aioredis.Redis, namespace: str
) -> None:
    spec = limits(t={"who": "vehicles", "rate": "10/s", "burst": 3})
    limiter = RateLimiter(redis, namespace, spec)
    verdicts = await burst_of(limiter, 5)
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    # Asked at one instant: the fourth must wait exactly one interval, and so must the
    # fifth (the fourth, refused, took nothing).
    assert verdicts[3] == Verdict(False, "t", 0.1)
    assert verdicts[4] == Verdict(False, "t", 0.1)


async def test_buckets_refill_on_redis_time_and_expire_when_full(
    redis: aioredis.Redis, namespace: str
) -> None:
    spec = limits(t={"who": "vehicles", "rate": "20/s", "burst": 2})
    limiter = RateLimiter(redis, namespace, spec)
    assert [v.allowed for v in await burst_of(limiter, 3)] == [True, True, False]
    key = limiter.key("t", "vehicles")
    seconds, micros = await redis.time()
    now_us = seconds * 1_000_000 + micros
    stored = float(await redis.get(key))
    # The bucket holds the time it is full again, on Redis's clock: 2 takes of 50 ms ahead.
    assert now_us < stored <= now_us + 100_000
    assert 0 < await redis.pttl(key) <= 100
    # Refilled by time passing alone (one take each 50 ms).
    async def refilled() -> bool:
        return (await limiter.take("vehicles", (), "vehicle.v1.x")).allowed

    await eventually(refilled, what="a refill")
    # Full again: the key is gone, and so is every trace of the bucket.
    async def gone() -> bool:
        return await redis.exists(key) == 0

    await eventually(gone, what="the idle bucket's key expires")
    assert [v.allowed for v in await burst_of(limiter, 3)] == [True, True, False]


async def test_who_and_topics_decide_which_buckets_count(
    redis: aioredis.Redis, namespace: str
) -> None:
    slow = {"rate": "1/min", "burst": 2}
    limiter = RateLimiter(
        redis,
        namespace,
        limits(
            own={"who": "fleet", "topics": "vehicle.#", **slow},
            together={"who": "fleet", "topics": "alerts.*", "shared": True, **slow},
            everyone={"who": "*", "topics": "news.#", **slow},
        ),
    )

    async def allowed(principal: str, roles: tuple[str, ...], topic: str, n: int) -> int:
        verdicts = [await limiter.take(principal, roles, topic) for _ in range(n)]
        return sum(v.allowed for v in verdicts)

    # Per principal: each member of the role has a bucket of its own.
    assert await allowed("cars", ("fleet",), "vehicle.c1.speed", 5) == 2
    assert await allowed("trucks", ("fleet",), "vehicle.t1.speed", 5) == 2
    # Shared: the role's members together.
    assert await allowed("cars", ("fleet",), "alerts.fire", 1) == 1
    assert await allowed("trucks", ("fleet",), "alerts.flood", 5) == 1
    # Everyone, each on its own.
    assert await allowed("cars", (), "news.today", 5) == 2
    assert await allowed("ops", (), "news.today", 5) == 2
    # Not named, or on a topic no limit matches: unlimited.
    assert await allowed("ops", (), "vehicle.c1.speed", 5) == 5
    assert await allowed("cars", ("fleet",), "weather.rain", 5) == 5
    assert await allowed("cars", ("fleet",), "alerts.fire.big", 5) == 5
    assert sorted(k.decode() for k in await redis.keys(f"{namespace}:ratelimit:*")) == sorted(
        [
            limiter.key("own", "cars"),
            limiter.key("own", "trucks"),
            f"{namespace}:ratelimit:together",
            limiter.key("everyone", "cars"),
            limiter.key("everyone", "ops"),
        ]
    )


async def test_a_message_takes_from_every_limit_or_from_none(
    redis: aioredis.Redis, namespace: str
) -> None:
    limiter = RateLimiter(
        redis,
        namespace,
        limits(
            overall={"who": "vehicles", "rate": "1/min", "burst": 4},
            alerts={"who": "vehicles", "topics": "alerts.#", "rate": "1/h", "burst": 1},
        ),
    )
    assert (await limiter.take("vehicles", (), "alerts.fire")).allowed
    refused = [await limiter.take("vehicles", (), "alerts.fire") for _ in range(3)]
    # "overall" has room, "alerts" has not (for an hour): refused, naming it.
    assert {(v.allowed, v.limit_name) for v in refused} == {(False, "alerts")}
    assert all(3500 < v.retry_after_s <= 3600 for v in refused)
    # The refused ones took nothing from "overall": 3 of its 4 are left.
    assert [(await limiter.take("vehicles", (), "other")).allowed for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    # Both full: the one that must drain longest is named.
    verdict = await limiter.take("vehicles", (), "alerts.fire")
    assert verdict.limit_name == "alerts"


async def test_costs_a_bucket_could_never_hold_are_refused(
    redis: aioredis.Redis, namespace: str
) -> None:
    limiter = RateLimiter(redis, namespace, limits(t={"who": "v", "rate": "1/s", "burst": 3}))
    with pytest.raises(ValueError, match=r"cost 4 exceeds the burst of limit 't' \(3\)"):
        await limiter.take("v", (), "a", cost=4)
    assert (await limiter.take("v", (), "a", cost=3)).allowed
    with pytest.raises(ValueError, match="cost 0 must be at least 1"):
        await limiter.take("v", (), "a", cost=0)


async def test_answers_come_in_the_order_asked(redis: aioredis.Redis, namespace: str) -> None:
    """A message no limit applies to does not overtake a decision asked before it."""
    limiter = RateLimiter(redis, namespace, limits(t={"who": "v", "rate": "1/s"}))
    done: list[str] = []

    async def take(name: str, principal: str) -> None:
        await limiter.take(principal, (), "a")
        done.append(name)

    await asyncio.gather(take("limited", "v"), take("free", "w"), take("limited-2", "v"))
    assert done == ["limited", "free", "limited-2"]
    # With nothing outstanding, a free one passes without waiting for Redis at all.
    assert (await limiter.take("w", (), "a")).allowed


# --- replicas ------------------------------------------------------------------------------


async def test_two_replicas_together_hold_the_limit(
    redis: aioredis.Redis, namespace: str, redis_url: str
) -> None:
    spec = limits(t={"who": "vehicles", "rate": "1/min", "burst": 50})
    other = aioredis.Redis.from_url(redis_url)
    try:
        replicas = [RateLimiter(redis, namespace, spec), RateLimiter(other, namespace, spec)]

        async def waves(limiter: RateLimiter) -> int:
            allowed = 0
            for _ in range(5):
                allowed += sum(v.allowed for v in await burst_of(limiter, 40))
            return allowed

        counts = await asyncio.gather(*(waves(r) for r in replicas))
        # 400 asked within well under a minute: the burst and not one more.
        assert sum(counts) == 50
    finally:
        await other.aclose()


async def test_two_replicas_together_hold_the_rate(
    redis: aioredis.Redis, namespace: str, redis_url: str
) -> None:
    rate, burst = 200, 20
    spec = limits(t={"who": "vehicles", "rate": f"{rate}/s", "burst": burst})
    other = aioredis.Redis.from_url(redis_url)
    try:
        replicas = [RateLimiter(redis, namespace, spec), RateLimiter(other, namespace, spec)]

        async def waves(limiter: RateLimiter) -> int:
            allowed = 0
            for _ in range(30):
                allowed += sum(v.allowed for v in await burst_of(limiter, 20))
            return allowed

        start = await redis.time()
        counts = await asyncio.gather(*(waves(r) for r in replicas))
        end = await redis.time()
        elapsed = (end[0] - start[0]) + (end[1] - start[1]) / 1e6
        # Full at the start; whatever the timing, no more than it refilled meanwhile.
        assert burst <= sum(counts) <= burst + rate * elapsed
        assert sum(counts) < 1200
    finally:
        await other.aclose()


# --- Redis down ----------------------------------------------------------------------------


async def test_redis_down_fails_closed(namespace: str) -> None:
    closed = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1
    )
    try:
        limiter = RateLimiter(closed, namespace, limits(t={"who": "v", "rate": "1/s"}))
        for _ in range(2):  # a failed batch does not wedge the next one
            with pytest.raises(RateLimitUnavailable, match=r"rate limits unavailable \(Redis: "):
                await limiter.take("v", (), "a")
        # Unlimited messages wait behind the failing ones, then pass.
        results = await asyncio.gather(
            limiter.take("v", (), "a"), limiter.take("w", (), "a"), return_exceptions=True
        )
        assert isinstance(results[0], RateLimitUnavailable)
        assert results[1] == Verdict(True)
    finally:
        await closed.aclose()


# --- the gateway stage ---------------------------------------------------------------------

POLICY = """
principals:
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
  monitor: {kind: agent}
  bridge: {kind: bridge}
  viewer: {kind: user}
roles:
  fleet: [vehicles]
"""

STAGE_LIMITS = {
    "telemetry": {"who": "fleet", "topics": "vehicle.#", "rate": "1/min", "burst": 2},
    "notes": {"who": "*", "topics": "notes.#", "rate": "1/min", "burst": 1},
    "watching": {"who": "monitor", "rate": "1/min", "burst": 1},
}


@pytest.fixture
async def delivered(
    settings: Settings,
) -> AsyncIterator[Callable[[str], Awaitable[AbstractIncomingMessage]]]:
    """A real delivery from ``app_id`` (the stage reads only the sender's identity)."""
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)

        async def deliver(app_id: str) -> AbstractIncomingMessage:
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}", app_id=app_id), routing_key=queue.name
            )
            async def got() -> AbstractIncomingMessage | None:
                return await queue.get(no_ack=True, fail=False)

            incoming = await eventually(got)
            assert incoming is not None
            return incoming

        yield deliver
    finally:
        await connection.close()


def stage_for(redis: aioredis.Redis, namespace: str) -> RateLimit:
    policy = parse_policy(POLICY)
    return RateLimit(policy, RateLimiter(redis, namespace, limits(**STAGE_LIMITS)))


def passage(
    incoming: AbstractIncomingMessage,
    topic: str,
    principal: str | None = None,
    delegated_by: str | None = None,
) -> Passage:
    """A passage as authorize leaves it: ``principal`` (and ``delegated_by``) decided."""
    return Passage(incoming, topic, principal=principal, delegated_by=delegated_by)


async def test_the_stage_refuses_naming_the_limit_and_the_wait(
    redis: aioredis.Redis,
    namespace: str,
    delivered: Callable[[str], Awaitable[AbstractIncomingMessage]],
) -> None:
    stage = stage_for(redis, namespace)
    v7, monitor = await delivered("v7"), await delivered("monitor")
    for _ in range(2):
        await stage(passage(v7, "vehicle.v7.speed", principal="vehicles"))
    with pytest.raises(RateLimited) as refused:
        await stage(passage(v7, "vehicle.v7.speed", principal="vehicles"))
    assert isinstance(refused.value, Denied)
    assert refused.value.stage == "rate-limit"
    assert refused.value.limit == "telemetry"
    assert 50 < refused.value.retry_after_s <= 60
    assert refused.value.reason.startswith(
        "limit 'telemetry' (1/min for fleet on vehicle.#): retry after "
    )
    assert refused.value.reason.endswith(" s")
    # The sender's notice names the limit and the wait besides the reason.
    assert refused.value.notice() == {
        "error": refused.value.reason,
        "type": "Denied",
        "stage": "rate-limit",
        "limit": "telemetry",
        "retry_after": refused.value.retry_after_s,
    }
    # The mesh's own traffic is never limited ("watching" is on every topic).
    for _ in range(3):
        await stage(passage(monitor, "_req.v7.status", principal="monitor"))
    await stage(passage(monitor, "vehicle.v7.speed", principal="monitor"))
    with pytest.raises(RateLimited, match="limit 'watching' \\(1/min for monitor on #\\)"):
        await stage(passage(monitor, "vehicle.v7.speed", principal="monitor"))


async def test_the_stage_counts_on_behalf_of_the_token_principal(
    redis: aioredis.Redis,
    namespace: str,
    delivered: Callable[[str], Awaitable[AbstractIncomingMessage]],
) -> None:
    """Authorize decided for the token principal (``Passage.principal``): the stage counts
    its events, not the delegating bridge's."""
    stage = stage_for(redis, namespace)
    bridge = await delivered("bridge")
    for_viewer = {"principal": "viewer", "delegated_by": "bridge"}
    await stage(passage(bridge, "notes.a", **for_viewer))
    with pytest.raises(RateLimited, match="limit 'notes'"):
        await stage(passage(bridge, "notes.a", **for_viewer))
    assert await redis.exists(stage.limiter.key("notes", "viewer"))
    # The bridge's own bucket is untouched.
    await stage(passage(bridge, "notes.a", principal="bridge"))
    # No principal decided (no authorize before it, or an unknown one): refused, not counted.
    with pytest.raises(Denied, match=r"no principal of the policy sent 'notes\.a'"):
        await stage(passage(await delivered("x1"), "notes.a"))
    with pytest.raises(Denied, match=r"no principal of the policy sent 'notes\.a'"):
        await stage(passage(bridge, "notes.a", principal="nobody"))


async def test_the_stage_fails_closed_without_redis(
    namespace: str, delivered: Callable[[str], Awaitable[AbstractIncomingMessage]]
) -> None:
    """Redis unreachable: ``Unavailable`` (the gateway closes its gate and waits), never a
    pass and never a denial."""
    closed = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1
    )
    try:
        stage = stage_for(closed, namespace)
        with pytest.raises(Unavailable, match="rate limits: "):
            await stage(passage(await delivered("v7"), "vehicle.v7.speed", principal="vehicles"))
    finally:
        await closed.aclose()
