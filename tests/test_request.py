"""Request/reply through the gateway: @rpc on agents and behaviours, replicas, failures."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from agents_core import Recorder, broker, recorder
from agents_reliability import peek
from helpers import eventually, running
from pydantic import BaseModel

from behaviours import OneShotBehaviour, SubscriberBehaviour
from mesh import Agent, Message, RemoteError, RequestTimeout, Settings, rpc
from mesh.audit import AuditFilter, AuditReader, AuditRecord
from mesh.gateway import Gateway


class Question(BaseModel):
    a: int
    b: int


class Answer(BaseModel):
    total: int
    served_by: str
    """The callee instance that answered."""
    asked_by: str | None
    """The caller instance as the callee saw it."""
    behaviour: str | None = None
    """The calling behaviour, if a behaviour asked."""


class Multiply(SubscriberBehaviour):
    """A behaviour that serves an operation of its own."""

    @rpc("mul", model=Question)
    async def mul(self, msg: Message, question: Question) -> Answer:
        return Answer(
            total=question.a * question.b,
            served_by=self.agent.instance,
            asked_by=msg.instance,
            behaviour=msg.behaviour,
        )


class Calculator(Recorder):
    behaviours = [Multiply]

    @rpc("add", model=Question)
    async def add(self, msg: Message, question: Question) -> Answer:
        assert isinstance(question, Question)
        self.counts["add"] += 1
        return Answer(
            total=question.a + question.b,
            served_by=self.instance,
            asked_by=msg.instance,
            behaviour=msg.behaviour,
        )

    @rpc("fail")
    async def fail(self, msg: Message, payload: object) -> None:
        self.counts["fail"] += 1
        raise ValueError(f"cannot handle {payload!r}")

    @rpc("odd")
    async def odd(self, msg: Message, payload: object) -> object:
        self.counts["odd"] += 1
        return object()  # not JSON: the reply cannot be encoded

    @rpc("block")
    async def block(self, msg: Message, payload: object) -> str:
        self.events["blocked"].set()
        await self.events["release"].wait()
        self.counts["block_done"] += 1
        return "late"


async def test_request_to_agent_rpc_with_models(settings: Settings) -> None:
    """An agent-level @rpc gets a validated model; the caller gets the reply as a model."""
    calc = Calculator("calc", settings=settings)
    caller = Agent("caller", settings=settings, instance="c1")
    async with running(Gateway(settings=settings), calc, caller):
        answer = await caller.request("calc", "add", Question(a=2, b=3), model=Answer)
        assert answer == Answer(total=5, served_by=calc.instance, asked_by="c1")
        # Without model= the caller gets the JSON payload.
        raw = await caller.request("calc", "add", {"a": 1, "b": 1})
        assert raw == {"total": 2, "served_by": calc.instance, "asked_by": "c1",
                       "behaviour": None}


class Asker(OneShotBehaviour):
    async def run(self) -> int:
        reply = await self.request("calc", "mul", {"a": 6, "b": 7}, timeout=5)
        answer = Answer.model_validate(reply)
        recorder(self).counts["answer"] = answer.total
        assert answer.behaviour == self.name
        return 0


class AskingAgent(Recorder):
    behaviours = [Asker]


async def test_request_to_behaviour_rpc_from_a_behaviour(settings: Settings) -> None:
    """A behaviour's @rpc serves requests; a behaviour can call it, named as the sender."""
    calc = Calculator("calc", settings=settings)
    caller = Agent("caller", settings=settings)
    async with running(Gateway(settings=settings), calc, caller):
        answer = await caller.request("calc", "mul", Question(a=3, b=4), model=Answer)
        assert answer.total == 12
        assert answer.served_by == calc.instance

        asking = AskingAgent("asking", settings=settings)
        async with running(asking):
            assert await asyncio.wait_for(asking.behaviour("asker").wait(), 10) == 0
            assert asking.counts["answer"] == 42


async def test_replies_reach_the_asking_instance(settings: Settings) -> None:
    """With two caller and two callee replicas, each caller instance gets the answers to its
    own requests, and both callee instances serve some."""
    per_caller = 10
    callees = [Calculator("calc", settings=settings, instance=f"k{i}") for i in (1, 2)]
    callers = [Agent("caller", settings=settings, instance=f"c{i}") for i in (1, 2)]
    async with running(Gateway(settings=settings), *callees, *callers):

        async def ask(caller: Agent, n: int) -> tuple[int, Answer]:
            question = Question(a=n, b=1000 * int(caller.instance[1:]))
            return question.a + question.b, await caller.request(
                "calc", "add", question, model=Answer
            )

        results = await asyncio.gather(
            *(ask(caller, n) for caller in callers for n in range(per_caller))
        )
        for caller, start in zip(callers, (0, per_caller), strict=True):
            mine = results[start : start + per_caller]
            for expected, answer in mine:
                assert answer.total == expected
                assert answer.asked_by == caller.instance
        served = {instance: sum(1 for _, a in results if a.served_by == instance)
                  for instance in ("k1", "k2")}
        assert sum(served.values()) == 2 * per_caller
        assert served["k1"] > 0, served
        assert served["k2"] > 0, served
        assert callees[0].counts["add"] == served["k1"]
        assert callees[1].counts["add"] == served["k2"]


async def test_timeout_and_late_reply(settings: Settings) -> None:
    """A callee that blocks makes ``request`` raise ``RequestTimeout``; its late reply is
    refused at the gateway (past the request's deadline) and audited with the reason, not
    dead-lettered, and the caller keeps working."""
    calc = Calculator("calc", settings=settings)
    caller = Agent("caller", settings=settings)
    async with running(Gateway(settings=settings), calc, caller), peek(settings) as amqp:
        with pytest.raises(RequestTimeout, match=r"calc\.block"):
            await caller.request("calc", "block", {}, timeout=0.5)
        await asyncio.wait_for(calc.events["blocked"].wait(), 5)

        calc.events["release"].set()
        await eventually(lambda: calc.counts["block_done"] == 1, timeout=5)
        late = await eventually(lambda: denied_reply_to(settings, caller.reply_to), timeout=15)
        assert (late.agent, late.type, late.stage) == ("calc", "reply", "replies")
        assert "no request is waiting for this reply" in (late.reason or "")
        assert await amqp.dead_letters_through_marker() == []
        assert not caller._awaited  # nothing left waiting

        answer = await caller.request("calc", "add", Question(a=1, b=2), model=Answer)
        assert answer.total == 3


async def test_raising_handler_gives_remote_error(settings: Settings) -> None:
    """A handler that raises answers with ``RemoteError`` naming the exception; no retry."""
    calc = Calculator("calc", settings=settings)
    caller = Agent("caller", settings=settings)
    async with running(Gateway(settings=settings), calc, caller):
        with pytest.raises(RemoteError) as caught:
            await caller.request("calc", "fail", {"x": 1})
        error = caught.value
        assert error.error_type == "ValueError"
        assert "cannot handle {'x': 1}" in error.detail
        assert str(error) == "calc.fail failed: ValueError: cannot handle {'x': 1}"
        assert (error.agent, error.operation) == ("calc", "fail")
        assert calc.counts["fail"] == 1


async def test_unencodable_result_gives_remote_error(settings: Settings) -> None:
    """A handler whose result cannot be sent as JSON fails like a raising handler: the caller
    gets ``RemoteError`` (not a timeout) and the request is acked, not left unacked."""
    calc = Calculator("calc", settings=settings)
    caller = Agent("caller", settings=settings)
    async with running(Gateway(settings=settings), caller), broker(settings) as amqp:
        async with running(calc):
            with pytest.raises(RemoteError) as caught:
                await caller.request("calc", "odd", {}, timeout=2)
            assert "JSON" in caught.value.detail
            assert calc.counts["odd"] == 1
        # Stopped, the callee returns unacked messages to its queue: there must be none.
        assert await amqp.depth("mesh.q.calc.rpc") == 0


async def test_invalid_payload_gives_invalid_request(settings: Settings) -> None:
    """A payload that fails the @rpc's model answers ``InvalidRequest`` and is dead-lettered
    with the validation error; the handler never runs."""
    calc = Calculator("calc", settings=settings)
    caller = Agent("caller", settings=settings)
    async with running(Gateway(settings=settings), calc, caller), peek(settings) as amqp:
        with pytest.raises(RemoteError) as caught:
            await caller.request("calc", "add", {"a": "not a number"})
        assert caught.value.error_type == "InvalidRequest"
        assert "Question" in caught.value.detail
        assert calc.counts["add"] == 0

        # The reply goes out before the dead letter: wait for the latter.
        incoming = await amqp.dead_letter()
        assert incoming.routing_key == "_req.calc.add"
        reason = str((incoming.headers or {}).get("x-mesh-reason"))
        assert "does not match Question" in reason


async def test_request_nobody_serves_fails_at_once(settings: Settings) -> None:
    """A request to an agent with no live instance fails before it is sent
    (``NoLiveInstance``, from the registry); one to an operation a live agent lacks is
    ``Unroutable`` (from the gateway).  Neither waits for the timeout."""
    calc = Calculator("calc", settings=settings)
    caller = Agent("caller", settings=settings)
    async with running(Gateway(settings=settings), calc, caller):
        with pytest.raises(RemoteError) as caught:
            await caller.request("ghost", "anything", {}, timeout=60)
        assert caught.value.error_type == "NoLiveInstance"
        assert "'ghost'" in caught.value.detail
        assert settings.namespace in caught.value.detail

        with pytest.raises(RemoteError) as caught:
            await caller.request("calc", "divide", {}, timeout=60)
        assert caught.value.error_type == "Unroutable"


async def denied_reply_to(settings: Settings, route: str) -> AuditRecord | None:
    """The gateway's audit record of a reply to ``route`` it denied, if there is one yet."""
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        reader = AuditReader(client, settings.namespace)
        async for entry in reader.entries(AuditFilter(decision="denied"), newest_first=True):
            if entry.record.topic == route:
                return entry.record
        return None
    finally:
        await client.aclose()
