"""Behaviour kinds, lifecycle, concurrency and the bounded mailbox, in a running agent."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from agents_core import Broker, Recorder, broker, recorder
from aio_pika.abc import AbstractQueue, AbstractRobustChannel
from helpers import eventually, running, take

from behaviours import (
    CyclicBehaviour,
    FSMBehaviour,
    OneShotBehaviour,
    PeriodicBehaviour,
    SubscriberBehaviour,
    TimeoutBehaviour,
    fsm_state,
)
from mesh import Agent, Behaviour, BehaviourStatus, Message, Settings, on
from mesh.gateway import Gateway


@pytest.fixture
def quick(settings: Settings) -> Settings:
    """The test's settings with a short drain, so a test that fails mid-handler ends soon."""
    return settings.model_copy(update={"shutdown_timeout": 3.0})


# --- the kinds -----------------------------------------------------------------------


class Spin(CyclicBehaviour):
    async def run(self) -> None:
        lab = recorder(self)
        lab.counts["spin"] += 1
        if lab.counts["spin"] >= 3:
            lab.events["spun"].set()


class SpinAgent(Recorder):
    behaviours = [Spin]


async def test_cyclic_runs_until_stopped(settings: Settings) -> None:
    """A cyclic behaviour calls ``run`` again and again; ``stop`` ends it with the given code."""
    agent = SpinAgent("spinner", settings=settings)
    async with running(agent):
        spin = agent.behaviour("spin")
        await asyncio.wait_for(agent.events["spun"].wait(), 5)
        assert spin.status is BehaviourStatus.RUNNING
        assert spin.kind == "cyclic"

        assert await agent.stop_behaviour("spin", exit_code=7) is spin
        assert spin.status is BehaviourStatus.STOPPED
        assert spin.exit_code == 7
        assert await spin.wait() == 7
        runs = agent.counts["spin"]
        assert runs >= 3
        # Stopped means stopped: starting again resets the exit code and runs it anew.
        agent.events["spun"].clear()
        agent.counts["spin"] = 0
        await agent.start_behaviour("spin")
        assert spin.status is BehaviourStatus.RUNNING
        assert spin.exit_code is None
        await asyncio.wait_for(agent.events["spun"].wait(), 5)


class Answer(OneShotBehaviour):
    async def run(self) -> int:
        recorder(self).counts["answer"] += 1
        return 42


class Quiet(OneShotBehaviour):
    async def run(self) -> None:
        recorder(self).counts["quiet"] += 1


class OneShots(Recorder):
    behaviours = [Answer, Quiet]


async def test_oneshot_return_value_is_exit_code(settings: Settings) -> None:
    """A one-shot runs once; its return value is its exit code (None → 0), status done."""
    agent = OneShots("oneshots", settings=settings)
    async with running(agent):
        answer, quiet = agent.behaviour("answer"), agent.behaviour("quiet")
        assert await asyncio.wait_for(answer.wait(), 5) == 42
        assert await asyncio.wait_for(quiet.wait(), 5) == 0
        assert answer.status is BehaviourStatus.DONE
        assert quiet.status is BehaviourStatus.DONE
        assert answer.exit_code == 42
        assert agent.counts == {"answer": 1, "quiet": 1}


class Boom(OneShotBehaviour):
    async def run(self) -> int:
        raise RuntimeError("boom goes the behaviour")


class Survivor(SubscriberBehaviour):
    @on("still.here")
    async def here(self, msg: Message, payload: object) -> None:
        recorder(self).received.put_nowait((self.name, msg))


class Fragile(Recorder):
    behaviours = [Boom, Spin, Survivor]


async def test_failing_oneshot_fails_alone(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A one-shot that raises ends ``failed`` with exit code 1, logged with its traceback;
    the agent's other behaviours keep running and handling messages."""
    agent = Fragile("fragile", settings=settings)
    async with running(Gateway(settings=settings), agent):
        boom = agent.behaviour("boom")
        assert await asyncio.wait_for(boom.wait(), 5) == 1
        assert boom.status is BehaviourStatus.FAILED
        failures = [r for r in caplog.records if "behaviour boom failed" in r.getMessage()]
        assert failures
        assert failures[0].exc_info is not None
        assert "boom goes the behaviour" in str(failures[0].exc_info[1])

        runs = agent.counts["spin"]
        await eventually(lambda: agent.counts["spin"] > runs + 10)
        assert agent.behaviour("spin").status is BehaviourStatus.RUNNING
        await agent.publish("still.here", {"ok": True})
        [(name, message)] = await take(agent.received, 1)
        assert (name, message.payload) == ("survivor", {"ok": True})


class Tick(PeriodicBehaviour):
    period = 0.02

    async def tick(self) -> None:
        lab = recorder(self)
        lab.counts["tick"] += 1
        if lab.counts["tick"] == 3:
            lab.events["ticked"].set()


class Ticker(Recorder):
    behaviours = [Tick]


async def test_periodic_ticks_repeatedly(settings: Settings) -> None:
    """A periodic behaviour calls ``tick`` every ``period`` until stopped."""
    agent = Ticker("ticker", settings=settings)
    async with running(agent):
        await asyncio.wait_for(agent.events["ticked"].wait(), 5)
        assert agent.counts["tick"] >= 3
        tick = agent.behaviour("tick")
        assert tick.kind == "periodic"
        assert tick.status is BehaviourStatus.RUNNING
        await tick.stop()
        ticks = agent.counts["tick"]
        assert tick.status is BehaviourStatus.STOPPED
        assert tick.exit_code == 0
        # Nothing is scheduled any more: the behaviour's task is over.
        assert await tick.wait() == 0
        assert agent.counts["tick"] == ticks


DELAY = 0.2


class Alarm(TimeoutBehaviour):
    delay = DELAY

    async def setup(self) -> None:
        recorder(self).counts["armed_ms"] = round(asyncio.get_running_loop().time() * 1000)

    async def run(self) -> int:
        lab = recorder(self)
        lab.counts["alarm"] += 1
        lab.counts["fired_ms"] = round(asyncio.get_running_loop().time() * 1000)
        lab.events["alarm"].set()
        return 3


class AlarmAgent(Recorder):
    behaviours = [Alarm]


async def test_timeout_fires_once_after_its_delay(settings: Settings) -> None:
    """A timeout behaviour runs once, no earlier than ``delay`` after it started; then done."""
    agent = AlarmAgent("alarm", settings=settings)
    async with running(agent):
        alarm = agent.behaviour("alarm")
        assert await asyncio.wait_for(alarm.wait(), 5) == 3
        assert agent.counts["alarm"] == 1
        assert alarm.status is BehaviourStatus.DONE
        waited_ms = agent.counts["fired_ms"] - agent.counts["armed_ms"]
        assert waited_ms >= DELAY * 1000 - 5


async def test_timeout_at_a_point_in_time(settings: Settings) -> None:
    """With ``at``, a timeout behaviour runs once when that time has come."""
    due = datetime.now(UTC) + timedelta(seconds=DELAY)

    class AtTime(TimeoutBehaviour):
        at = due

        async def run(self) -> None:
            recorder(self).counts["at"] += 1
            recorder(self).events["at"].set()

    class AtAgent(Recorder):
        behaviours = [AtTime]

    agent = AtAgent("at", settings=settings)
    async with running(agent):
        await asyncio.wait_for(agent.events["at"].wait(), 5)
        assert datetime.now(UTC) >= due
        assert await agent.behaviour("at_time").wait() == 0
        assert agent.counts["at"] == 1


class Walk(FSMBehaviour):
    transitions: ClassVar = {"start": {"work"}, "work": {"work", "finish"}}

    @fsm_state("start", initial=True)
    async def start_state(self) -> str:
        return "work"

    @fsm_state("work")
    async def work(self) -> str:
        lab = recorder(self)
        lab.counts["work"] += 1
        return "work" if lab.counts["work"] < 3 else "finish"

    @fsm_state("finish", final=True)
    async def finish(self) -> int:
        return 4


class Stray(FSMBehaviour):
    transitions: ClassVar = {"a": {"b"}, "b": {"end"}}

    @fsm_state("a", initial=True)
    async def a(self) -> str:
        return "end"  # not declared for "a"

    @fsm_state("b")
    async def b(self) -> str:
        return "end"

    @fsm_state("end", final=True)
    async def end(self) -> None:
        recorder(self).counts["stray_end"] += 1


class Machines(Recorder):
    behaviours = [Walk, Stray]


async def test_fsm_walks_to_its_final_state(settings: Settings) -> None:
    """An FSM runs its states in order to the final one, whose int result is the exit code;
    a transition that ``transitions`` does not declare fails it."""
    agent = Machines("machines", settings=settings)
    async with running(agent):
        walk = agent.behaviour("walk")
        assert isinstance(walk, Walk)
        assert await asyncio.wait_for(walk.wait(), 5) == 4
        assert walk.status is BehaviourStatus.DONE
        assert walk.history == ["start", "work", "work", "work", "finish"]
        assert walk.current == "finish"
        assert walk.kind == "fsm"


async def test_fsm_undeclared_transition_fails(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """An undeclared transition ends the FSM ``failed`` (exit 1) before the next state runs."""
    agent = Machines("machines", settings=settings)
    async with running(agent):
        stray = agent.behaviour("stray")
        assert isinstance(stray, Stray)
        assert await asyncio.wait_for(stray.wait(), 5) == 1
        assert stray.status is BehaviourStatus.FAILED
        assert stray.history == ["a"]
        assert agent.counts["stray_end"] == 0
        assert any(
            "transition 'a' -> 'end' is not declared" in str(r.exc_info[1])
            for r in caplog.records
            if r.exc_info
        )


# --- many behaviours, concurrency, the mailbox ----------------------------------------

MANY = 20


class Crowd(Recorder):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.barrier = asyncio.Barrier(MANY)


def member(index: int) -> type[Behaviour]:
    """A behaviour that meets all the others at a barrier, then serves ``crowd.<index>``."""

    class Member(SubscriberBehaviour):
        name = f"member{index}"

        async def main(self) -> int | None:
            agent = recorder(self)
            assert isinstance(agent, Crowd)
            await agent.barrier.wait()  # only passes if all MANY mains run at once
            agent.counts["met"] += 1
            return await super().main()

        @on(f"crowd.{index}")
        async def handle(self, msg: Message, payload: object) -> None:
            recorder(self).received.put_nowait((self.name, msg))

    return Member


async def test_many_behaviours_run_concurrently(settings: Settings) -> None:
    """20 behaviours of one agent all run at once, each with its own subscription."""

    class CrowdAgent(Crowd):
        behaviours = [member(i) for i in range(MANY)]

    agent = CrowdAgent("crowd", settings=settings)
    async with running(Gateway(settings=settings), agent):
        await eventually(lambda: agent.counts["met"] == MANY, timeout=5)
        assert all(b.is_running for b in agent.behaviour_map.values())
        for index in reversed(range(MANY)):
            await agent.publish(f"crowd.{index}", {"index": index})
        received = await take(agent.received, MANY)
        assert sorted((name, msg.payload["index"]) for name, msg in received) == sorted(
            (f"member{i}", i) for i in range(MANY)
        )


class Starters(Agent):
    """Its behaviours' queue declarations meet at ``declaring`` before any goes on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.declaring = asyncio.Barrier(len(self.behaviours))


def starter(index: int) -> type[SubscriberBehaviour]:
    class Starter(SubscriberBehaviour):
        name = f"starter{index}"

        async def declare_queue(self, channel: AbstractRobustChannel) -> AbstractQueue:
            agent = self.agent
            assert isinstance(agent, Starters)
            # Passes only when every behaviour is declaring at the same time.
            await asyncio.wait_for(agent.declaring.wait(), 10)
            return await super().declare_queue(channel)

        @on(f"start.{index}")
        async def handle(self, msg: Message, payload: object) -> None:
            return None

    return Starter


async def test_an_agent_declares_its_behaviours_queues_at_once(settings: Settings) -> None:
    """Starting 1,000 behaviours one after another took 12.5 s: they start concurrently."""

    class FourStarters(Starters):
        behaviours = [starter(i) for i in range(4)]

    agent = FourStarters("starters", settings=settings)
    async with running(agent):
        assert all(b.is_running for b in agent.behaviour_map.values())


class Gatekeeper(Recorder):
    """Handlers wait at ``gate`` (a semaphore the test releases) after entering."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Semaphore(0)
        self.active = 0
        self.peak = 0

    async def pass_gate(self, behaviour: Behaviour, msg: Message) -> None:
        """Count ``msg``'s handler in (``entered``, ``active``, ``peak``), wait at ``gate``,
        then report it on ``received``."""
        self.counts["entered"] += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.gate.acquire()
        finally:
            self.active -= 1
        self.received.put_nowait((behaviour.name, msg))


def gatekeeper(behaviour: Behaviour) -> Gatekeeper:
    """The ``Gatekeeper`` that runs ``behaviour``."""
    agent = recorder(behaviour)
    assert isinstance(agent, Gatekeeper), f"{behaviour.name} must run in a Gatekeeper"
    return agent


class Gated(SubscriberBehaviour):
    mailbox_size = 5

    @on("gated.#")
    async def handle(self, msg: Message, payload: object) -> None:
        await gatekeeper(self).pass_gate(self, msg)


class MailboxAgent(Gatekeeper):
    behaviours = [Gated]


async def test_mailbox_bounds_unacked_messages(quick: Settings) -> None:
    """With mailbox_size=5 and a blocked handler, the behaviour holds at most 5 messages:
    the rest stay ready in its queue, and each ack lets exactly one more in."""
    total, mailbox = 20, Gated.mailbox_size
    queue = "mesh.q.mailbox.gated"
    agent = MailboxAgent("mailbox", settings=quick)
    async with running(Gateway(settings=quick), agent), broker(quick) as amqp:
        for n in range(total):
            await agent.publish("gated.item", {"n": n})
        # All 20 reached the queue; 5 went to the behaviour, 1 of them into the handler.
        await eventually(lambda: depth_is(amqp, queue, total - mailbox), timeout=5)
        assert agent.counts["entered"] == 1

        for handled in range(1, 4):
            agent.gate.release()
            await eventually(
                lambda h=handled: depth_is(amqp, queue, total - mailbox - h), timeout=5
            )
            await eventually(lambda h=handled: agent.counts["entered"] == h + 1, timeout=5)

        for _ in range(total):
            agent.gate.release()
        received = await take(agent.received, total)
        assert [m.payload["n"] for _, m in received] == list(range(total))
        assert agent.counts["entered"] == total
        assert agent.peak == 1
        assert await amqp.depth(queue) == 0


async def depth_is(amqp: Broker, queue: str, expected: int) -> bool:
    return await amqp.depth(queue) == expected


async def hand_over(agent: Agent, amqp: Broker, prefix: str, count: int, queue: str) -> None:
    """Publish ``count`` messages ``<prefix>.item`` ({"n": 0...}) and wait until the gateway
    has relayed them all and the broker has handed every one from ``queue`` to the behaviour."""
    relayed = await amqp.tap("mesh.topic", f"{prefix}.#")
    for n in range(count):
        await agent.publish(f"{prefix}.item", {"n": n})
    await eventually(lambda: depth_is(amqp, relayed.name, count), timeout=5)
    await eventually(lambda: depth_is(amqp, queue, 0), timeout=5)


class Quartet(SubscriberBehaviour):
    max_concurrency = 4

    @on("four.#")
    async def handle(self, msg: Message, payload: object) -> None:
        await gatekeeper(self).pass_gate(self, msg)


class QuartetAgent(Gatekeeper):
    behaviours = [Quartet]


async def test_max_concurrency_runs_that_many_handlers_at_once(quick: Settings) -> None:
    """max_concurrency=4: four handlers run at the same time, never a fifth."""
    agent = QuartetAgent("quartet", settings=quick)
    async with running(Gateway(settings=quick), agent), broker(quick) as amqp:
        # All ten are handed to the behaviour: four run, six wait in its mailbox.
        await hand_over(agent, amqp, "four", 10, queue="mesh.q.quartet.quartet")
        await eventually(lambda: agent.active == 4, timeout=5)
        for _ in range(10):
            agent.gate.release()
        received = await take(agent.received, 10)
        assert sorted(m.payload["n"] for _, m in received) == list(range(10))
        assert agent.peak == 4


class Solo(SubscriberBehaviour):
    max_concurrency = 1

    @on("solo.#")
    async def handle(self, msg: Message, payload: object) -> None:
        await gatekeeper(self).pass_gate(self, msg)


class SoloAgent(Gatekeeper):
    behaviours = [Solo]


async def test_max_concurrency_one_runs_one_at_a_time(quick: Settings) -> None:
    """max_concurrency=1: with five messages delivered, one handler runs; order is kept."""
    agent = SoloAgent("solo", settings=quick)
    async with running(Gateway(settings=quick), agent), broker(quick) as amqp:
        # All five are handed to the behaviour: four wait in its mailbox.
        await hand_over(agent, amqp, "solo", 5, queue="mesh.q.solo.solo")
        await eventually(lambda: agent.counts["entered"] == 1, timeout=5)
        assert agent.active == 1
        for _ in range(5):
            agent.gate.release()
        received = await take(agent.received, 5)
        assert [m.payload["n"] for _, m in received] == list(range(5))
        assert agent.peak == 1


# --- stopping and starting at runtime ---------------------------------------------------


class Pausable(SubscriberBehaviour):
    @on("pause.#")
    async def handle(self, msg: Message, payload: object) -> None:
        recorder(self).received.put_nowait((self.name, msg))


class PausableAgent(Recorder):
    behaviours = [Pausable]


async def test_stopped_behaviour_keeps_its_messages_until_started(settings: Settings) -> None:
    """Messages published while a behaviour is stopped wait in its queue and are handled,
    in order, once it starts again."""
    queue = "mesh.q.pausable.pausable"
    agent = PausableAgent("pausable", settings=settings)
    async with running(Gateway(settings=settings), agent), broker(settings) as amqp:
        await agent.publish("pause.before", {"n": 0})
        [(_, first)] = await take(agent.received, 1)
        assert first.payload == {"n": 0}

        pausable = await agent.stop_behaviour("pausable")
        assert pausable.status is BehaviourStatus.STOPPED
        for n in range(1, 4):
            await agent.publish("pause.during", {"n": n})
        await eventually(lambda: depth_is(amqp, queue, 3), timeout=5)
        assert agent.received.empty()

        await agent.start_behaviour("pausable")
        assert pausable.status is BehaviourStatus.RUNNING
        received = await take(agent.received, 3)
        assert [m.payload["n"] for _, m in received] == [1, 2, 3]
        await eventually(lambda: depth_is(amqp, queue, 0), timeout=5)


class Drained(SubscriberBehaviour):
    @on("drain.#")
    async def handle(self, msg: Message, payload: object) -> None:
        await gatekeeper(self).pass_gate(self, msg)


class DrainAgent(Gatekeeper):
    behaviours = [Drained]


async def test_stop_finishes_in_flight_and_requeues_the_rest(quick: Settings) -> None:
    """``stop`` lets the running handler finish and returns the messages it had not started
    to the queue; a restart handles each of those once, and not the finished one again."""
    queue = "mesh.q.drain.drained"
    agent = DrainAgent("drain", settings=quick)
    async with running(Gateway(settings=quick), agent), broker(quick) as amqp:
        await hand_over(agent, amqp, "drain", 5, queue=queue)
        await eventually(lambda: agent.counts["entered"] == 1, timeout=5)

        drained = agent.behaviour("drained")
        stopping = asyncio.create_task(drained.stop(exit_code=2))
        # The stop has begun returning messages, but waits for the handler in flight.
        await eventually(lambda: amqp.depth(queue), timeout=5)
        assert not stopping.done()
        assert drained.status is BehaviourStatus.RUNNING
        agent.gate.release()
        assert await asyncio.wait_for(stopping, 5) == 2
        assert drained.status is BehaviourStatus.STOPPED
        [(_, first)] = await take(agent.received, 1)
        assert first.payload == {"n": 0}
        await eventually(lambda: depth_is(amqp, queue, 4), timeout=5)

        await agent.start_behaviour("drained")
        for _ in range(4):
            agent.gate.release()
        rest = await take(agent.received, 4)
        assert sorted(m.payload["n"] for _, m in rest) == [1, 2, 3, 4]
        await eventually(lambda: depth_is(amqp, queue, 0), timeout=5)
        assert agent.counts["entered"] == 5
        assert agent.received.empty()


class Suicidal(SubscriberBehaviour):
    @on("die.now")
    async def die(self, msg: Message, payload: object) -> None:
        recorder(self).received.put_nowait((self.name, msg))
        self.kill(9)


class Countdown(CyclicBehaviour):
    async def run(self) -> None:
        lab = recorder(self)
        lab.counts["countdown"] += 1
        if lab.counts["countdown"] == 3:
            self.kill(3)


class Mortal(Recorder):
    behaviours = [Suicidal, Countdown]


async def test_kill_from_inside(settings: Settings) -> None:
    """``kill(code)`` from a handler or from ``main`` stops the behaviour with that exit
    code; the handler's own message is still acked, not redelivered."""
    agent = Mortal("mortal", settings=settings)
    async with running(Gateway(settings=settings), agent), broker(settings) as amqp:
        countdown = agent.behaviour("countdown")
        assert await asyncio.wait_for(countdown.wait(), 5) == 3
        assert countdown.status is BehaviourStatus.STOPPED
        assert agent.counts["countdown"] == 3

        suicidal = agent.behaviour("suicidal")
        await agent.publish("die.now", {})
        await take(agent.received, 1)
        assert await asyncio.wait_for(suicidal.wait(), 5) == 9
        assert suicidal.status is BehaviourStatus.STOPPED
        assert suicidal.exit_code == 9
        assert await amqp.depth("mesh.q.mortal.suicidal") == 0
