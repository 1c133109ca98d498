"""Compiled broker permissions: the regexes alone, then on the broker as users holding them."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
from agents_reliability import Service, subscriber
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed
from helpers import running, take
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from behaviours import SubscriberBehaviour
from mesh import Agent, Message, Settings, TopicError, on, topology
from mesh.gateway import Gateway
from mesh.management import ManagementAPI, vhost_of
from mesh.policy.permissions import (
    ANY,
    NOTHING,
    UserPermissions,
    agent_permissions,
    covering_regex,
    gateway_permissions,
    operator_permissions,
)
from mesh.provision.credentials import url_as

# --- the reference: whether a pattern covers a binding key ---------------------------


def covers(pattern: str, key: str) -> bool:
    """Whether every topic ``key`` matches, ``pattern`` matches too, decided on automata.

    Both run side by side over every word either names plus one neither names (a pattern
    treats all words it does not name alike), looking for a topic ``key`` matches and
    ``pattern`` does not.  Topics may have no words: RabbitMQ routes the empty key to ``#``.
    """
    p, k = pattern.split("."), key.split(".")
    words = {w for w in (*p, *k) if w not in ("*", "#")} | {""}
    start = (_closure(k, {0}), _closure(p, {0}))
    seen, todo = {start}, [start]
    while todo:
        in_key, in_pattern = todo.pop()
        if len(k) in in_key and len(p) not in in_pattern:
            return False
        for word in words:
            after_key = _step(k, in_key, word)
            if after_key:
                pair = (after_key, _step(p, in_pattern, word))
                if pair not in seen:
                    seen.add(pair)
                    todo.append(pair)
    return True


def _closure(words: list[str], positions: set[int] | frozenset[int]) -> frozenset[int]:
    out = set(positions)
    for start in positions:
        i = start
        while i < len(words) and words[i] == "#":
            i += 1
            out.add(i)
    return frozenset(out)


def _step(words: list[str], positions: frozenset[int], word: str) -> frozenset[int]:
    after = set()
    for i in positions:
        if i < len(words) and words[i] == "#":
            after.add(i)
        elif i < len(words) and words[i] in ("*", word):
            after.add(i + 1)
    return _closure(words, after)


@cache
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(covering_regex(patterns))


def admits(patterns: Sequence[str], key: str) -> bool:
    """As RabbitMQ asks: a search anywhere in the key (the regex anchors itself)."""
    return _compiled(tuple(patterns)).search(key) is not None


# --- covering_regex --------------------------------------------------------------------

COVERING = [
    # a wider pattern admits narrower keys, never the reverse
    (["vehicle.#"], "vehicle.*.speed", True),
    (["vehicle.#"], "vehicle.v7.speed", True),
    (["vehicle.#"], "vehicle.#", True),
    (["vehicle.#"], "vehicle", True),
    (["vehicle.#"], "vehicle.*.#", True),
    (["vehicle.#"], "#", False),
    (["vehicle.#"], "vehicles.x", False),
    (["vehicle.#"], "fleet.vehicle.x", False),
    (["vehicle.*.speed"], "vehicle.*.speed", True),
    (["vehicle.*.speed"], "vehicle.v7.speed", True),
    (["vehicle.*.speed"], "vehicle.#", False),
    (["vehicle.*.speed"], "vehicle.#.speed", False),
    (["vehicle.*.speed"], "#", False),
    (["vehicle.*.speed"], "vehicle.v7.speed.x", False),
    (["vehicle.*.speed"], "vehicle.speed", False),
    # a literal covers only itself
    (["a.b"], "a.b", True),
    (["a.b"], "a.*", False),
    (["a.b"], "a.bb", False),
    (["a.b"], "a.b.c", False),
    # '#' matching no word: the dots around it
    (["a.#"], "a", True),
    (["#.b"], "b", True),
    (["#.b"], "a.b", True),
    (["#.b"], "ab", False),
    (["a.#.b"], "a.b", True),
    (["a.#.b"], "a.x.y.b", True),
    (["a.#.b"], "ab", False),
    (["#"], "#", True),
    (["#"], "a.*.#", True),
    (["#"], "_req.x.y", True),
    # runs of wildcards count only their '*' and whether they hold a '#'
    (["*.#"], "#.*", True),
    (["*.#"], "#", False),
    (["#.*"], "a.#", True),
    (["a.#.*"], "a.b.#", True),
    (["*.*.#"], "#.*.#.*", True),
    (["*.*.#"], "#.*", False),
    (["*"], "*", True),
    (["*"], "#", False),
    (["*"], "a.b", False),
    # several patterns: one must cover the key on its own
    (["a.*", "b.#"], "b.x.y", True),
    (["a.*", "b.#"], "a.x.y", False),
    # literals are escaped: '-' and '_' are word characters, not regex syntax
    (["a-b.c_d"], "a-b.c_d", True),
    (["a-b.c_d"], "a-b.cxd", False),
    # only well-formed keys of mesh words pass
    (["#"], ".a", False),
    (["#"], "a.", False),
    (["#"], "a..b", False),
    (["#"], "a b", False),
    (["#"], "a*", False),
    (["*.b"], ".b", False),
    # no patterns: nothing
    ([], "a", False),
    ([], "", False),
    ([], "#", False),
]


def well_formed(key: str) -> bool:
    try:
        topology.check_binding(key)
    except TopicError:
        return False
    return True


@pytest.mark.parametrize(("patterns", "key", "admitted"), COVERING)
def test_covering_regex(patterns: list[str], key: str, admitted: bool) -> None:
    assert admits(patterns, key) is admitted
    if well_formed(key):  # the table agrees with the reference
        assert admitted is any(covers(p, key) for p in patterns)


def test_covering_regex_refuses_invalid_patterns() -> None:
    for bad in ("", "a..b", "a.b*", "a b"):
        with pytest.raises(TopicError):
            covering_regex([bad])


def test_covering_regex_keeps_to_pcre_syntax() -> None:
    """Nothing Python-only, and no '{' (RabbitMQ expands '{username}' in topic permissions)."""
    regex = covering_regex(["a.#.b", "*.*", "#.x-y", "_ctl._all.*"])
    assert "{" not in regex
    assert "(?P" not in regex
    assert r"\Z" not in regex
    assert NOTHING == "^(?!)$"


_WORDS = st.sampled_from(["a", "b", "*", "#"])
_KEYS = st.lists(_WORDS, min_size=1, max_size=5).map(".".join)


@hypothesis_settings(max_examples=400, deadline=None)
@given(st.lists(_KEYS, min_size=1, max_size=3), _KEYS)
def test_covering_regex_admits_exactly_the_covered_keys(patterns: list[str], key: str) -> None:
    assert admits(patterns, key) is any(covers(p, key) for p in patterns)


@hypothesis_settings(max_examples=300, deadline=None)
@given(_KEYS, st.text(alphabet="ab*#._ ", max_size=10))
def test_covering_regex_admits_no_malformed_key(pattern: str, key: str) -> None:
    if admits([pattern], key):
        assert key == "" or well_formed(key)
        assert covers(pattern, key)


# --- the compiled permissions, as regexes -------------------------------------------------


def topic(permissions: UserPermissions, exchange: str) -> tuple[str, str]:
    """``(write, read)`` on ``exchange``."""
    (found,) = [t for t in permissions.topics if t.exchange == exchange]
    return found.write, found.read


def test_agent_permissions_name_only_its_own_queues() -> None:
    v7 = agent_permissions("v7", ["vehicle.#"])
    own = ("mesh.q.v7.tracker", "mesh.q.v7.rpc", "mesh.i.v7.i1._inbox-1", "mesh.i.v7.i1.b")
    # Its retry path is its own too (topology.declare_retry_path).
    retry_path = ("mesh.q.v7._retry", "mesh.q.v7._retry.1000", "mesh.q.v7._requeue")
    for name in (*own, *retry_path):
        assert all(re.search(r, name) for r in (v7.configure, v7.write, v7.read)), name
    for name in ("mesh.q.v70.b", "mesh.q.v8.b", "mesh.q.v7", "xmesh.q.v7.b", "mesh.gateway"):
        assert not any(re.search(r, name) for r in (v7.configure, v7.write, v7.read)), name
    exchanges = ["mesh.policy", "mesh.policy.internal", "mesh.dlx"]
    assert [e for e in [*exchanges, "mesh.topic", "mesh.internal"] if re.search(v7.write, e)] == (
        exchanges
    )
    assert not re.search(v7.configure, "mesh.topic")


def test_agent_topic_permissions() -> None:
    v7 = agent_permissions("v7", ["vehicle.*.speed"], registry_events=False)
    policy_write, _ = topic(v7, topology.POLICY_EXCHANGE)
    internal_write, _ = topic(v7, topology.INTERNAL_POLICY_EXCHANGE)
    _, internal_read = topic(v7, topology.INTERNAL_EXCHANGE)
    assert topic(v7, topology.TOPIC_EXCHANGE) == (NOTHING, covering_regex(["vehicle.*.speed"]))
    assert topic(v7, topology.DEAD_LETTER_EXCHANGE) == (ANY, NOTHING)
    cases = [
        (policy_write, "vehicle.v7.speed", True),
        (policy_write, "_req.v8.status", False),
        (internal_write, "_req.v8.status", True),
        (internal_write, "_reply.v8.i1", True),
        (internal_write, "_ctl._all.ping", True),
        (internal_write, "_registry.join", True),
        (internal_write, "_err.v8.i1", False),  # error notices are the gateway's
        (internal_write, "_req.v8", False),
        (internal_write, "vehicle.v7.speed", False),
        (internal_read, "_req.v7.status", True),
        (internal_read, "_req.v7.*", True),
        (internal_read, "_reply.v7.i1", True),
        (internal_read, "_err.v7.i1", True),
        (internal_read, "_ctl.v7.*", True),
        (internal_read, "_ctl._all.*", True),
        (internal_read, "_registry.*", False),  # registry_events=False
        (internal_read, "_reply.v8.i1", False),
        (internal_read, "_req.v7.#", False),
        (internal_read, "_req.#", False),
    ]
    assert [(k, re.search(r, k) is not None) for r, k, _ in cases] == [(k, a) for _, k, a in cases]


def test_agent_ids_are_escaped_and_checked() -> None:
    assert r"mesh\.[qi]\.a\-b\." in agent_permissions("a-b", []).configure
    for bad in ("a.b", "a*", "", "_all"):
        with pytest.raises(TopicError):
            agent_permissions(bad, [])
    with pytest.raises(TopicError):
        agent_permissions("v7", ["_req.#"])  # subscriptions are user patterns


def test_operator_and_gateway_permissions() -> None:
    operator = operator_permissions(tail=["vehicle.#"])
    assert operator.tags == ("management",)
    assert re.search(operator.configure, "mesh.i.client-1a2b3c4d.i1._inbox-1")
    assert re.search(operator.configure, "amq_0123456789abcdef0123456789abcdef")
    assert not re.search(operator.configure, "mesh.q.v7.b")
    assert re.search(operator_permissions(forget=True).configure, "mesh.q.v7.b")
    assert not re.search(operator.write, "mesh.topic")
    _, operator_inbox = topic(operator, topology.INTERNAL_EXCHANGE)
    assert re.search(operator_inbox, "_reply.client-1a2b3c4d.i1")
    assert not re.search(operator_inbox, "_reply.v7.i1")
    gateway = gateway_permissions()
    for name in ("mesh.topic", "mesh.internal", "mesh.dead.filing", "mesh.dlx"):
        assert re.search(gateway.write, name), name
    assert not re.search(gateway.write, "mesh.policy")
    assert not re.search(gateway.configure, "mesh.q.v7.b")
    assert not re.search(gateway.read, "mesh.q.v7.b")


# --- on the broker -------------------------------------------------------------------------

Users = Callable[[UserPermissions], Awaitable[str]]
"""Makes a user of the test's own holding the permissions given; returns its AMQP URL."""
Login = Callable[[UserPermissions], Awaitable[AbstractConnection]]
"""Connects as a user of the test's own holding the permissions given."""


async def grant(api: ManagementAPI, vhost: str, user: str, permissions: UserPermissions) -> None:
    """Give ``user`` the compiled ``permissions`` on ``vhost``."""
    p = permissions
    await api.set_permissions(vhost, user, p.configure, p.write, p.read)
    for t in p.topics:
        await api.set_topic_permissions(vhost, user, t.exchange, t.write, t.read)


@pytest.fixture
async def admin(settings: Settings) -> AsyncIterator[AbstractChannel]:
    """A channel with every right on the test's vhost, where the mesh's exchanges exist."""
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    await topology.declare_exchanges(channel)
    yield channel
    await connection.close()


@pytest.fixture
async def users(settings: Settings) -> AsyncIterator[Users]:
    api = ManagementAPI.for_settings(settings)
    made: list[str] = []

    async def make(permissions: UserPermissions) -> str:
        name, password = f"perm-test-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
        made.append(name)
        await api.put_user(name, password, permissions.tags)
        await grant(api, vhost_of(settings), name, permissions)
        return url_as(settings.amqp_url, name, password)

    yield make
    for name in made:
        await api.delete_user(name)


@pytest.fixture
async def login(users: Users) -> AsyncIterator[Login]:
    connections: list[AbstractConnection] = []

    async def connect(permissions: UserPermissions) -> AbstractConnection:
        connections.append(await aio_pika.connect(await users(permissions)))
        return connections[-1]

    yield connect
    for connection in connections:
        await connection.close()


Action = Callable[[AbstractChannel], Awaitable[object]]


async def outcome(connection: AbstractConnection, action: Action) -> str:
    """``ok``, ``refused`` (403 ACCESS_REFUSED) or ``precondition`` (406): the broker closes
    the channel on either, so each action gets a channel of its own."""
    channel = await connection.channel()
    try:
        async with asyncio.timeout(5):
            await action(channel)
    except ChannelAccessRefused:
        return "refused"
    except ChannelPreconditionFailed:
        return "precondition"
    finally:
        if not channel.is_closed:
            await channel.close()
    return "ok"


def publish(exchange: str, key: str, **properties: object) -> Action:
    async def action(channel: AbstractChannel) -> None:
        target = await channel.get_exchange(exchange, ensure=False) if exchange else None
        message = aio_pika.Message(b"{}", **properties)  # type: ignore[arg-type]
        await (target or channel.default_exchange).publish(message, key)

    return action


def bind(queue: str, exchange: str, key: str, *, exclusive: bool = False) -> Action:
    """Declare ``queue`` and bind it."""

    async def action(channel: AbstractChannel) -> None:
        declared = await channel.declare_queue(queue, exclusive=exclusive, auto_delete=True)
        await declared.bind(exchange, key)

    return action


async def outcomes(connection: AbstractConnection, cases: dict[str, Action]) -> dict[str, str]:
    return {name: await outcome(connection, action) for name, action in cases.items()}


async def test_agent_publishes_only_through_the_policy_exchanges(
    login: Login, admin: AbstractChannel
) -> None:
    v7 = await login(agent_permissions("v7", ["vehicle.#"]))
    assert await outcomes(
        v7,
        {
            "event": publish("mesh.policy", "vehicle.v7.speed"),
            "request": publish("mesh.policy.internal", "_req.v8.status"),
            "dead letter": publish("mesh.dlx", "vehicle.v7.speed"),
            "to mesh.topic": publish("mesh.topic", "vehicle.v7.speed"),
            "to mesh.internal": publish("mesh.internal", "_reply.v8.i1"),
            "to a queue directly": publish("", topology.GATEWAY_QUEUE),
            "request on the event lane": publish("mesh.policy", "_req.v8.status"),
            "error notice": publish("mesh.policy.internal", "_err.v8.i1"),
        },
    ) == {
        "event": "ok",
        "request": "ok",
        "dead letter": "ok",
        "to mesh.topic": "refused",
        "to mesh.internal": "refused",
        "to a queue directly": "refused",
        "request on the event lane": "refused",
        "error notice": "refused",
    }


async def test_user_id_must_be_the_connections_user(users: Users, admin: AbstractChannel) -> None:
    url = await users(agent_permissions("v7", []))
    own = urlsplit(url).username
    async with await aio_pika.connect(url) as connection:
        as_itself = await outcome(connection, publish("mesh.policy", "a", user_id=own))
        as_guest = await outcome(connection, publish("mesh.dlx", "a", user_id="guest"))
    assert (as_itself, as_guest) == ("ok", "precondition")


async def test_bindings_on_mesh_topic_are_what_subscriptions_cover(
    login: Login, admin: AbstractChannel
) -> None:
    wide = await login(agent_permissions("wide", ["vehicle.#"]))
    narrow = await login(agent_permissions("narrow", ["vehicle.*.speed"]))
    keys = ["vehicle.*.speed", "vehicle.v7.speed", "vehicle.#", "#", "fleet.x"]
    assert await outcomes(wide, {k: bind("mesh.q.wide.b", "mesh.topic", k) for k in keys}) == {
        "vehicle.*.speed": "ok",
        "vehicle.v7.speed": "ok",
        "vehicle.#": "ok",
        "#": "refused",
        "fleet.x": "refused",
    }
    assert await outcomes(narrow, {k: bind("mesh.q.narrow.b", "mesh.topic", k) for k in keys}) == {
        "vehicle.*.speed": "ok",
        "vehicle.v7.speed": "ok",
        "vehicle.#": "refused",
        "#": "refused",
        "fleet.x": "refused",
    }


async def test_inbox_binds_only_what_is_addressed_to_its_agent(
    login: Login, admin: AbstractChannel
) -> None:
    v7 = await login(agent_permissions("v7", [], registry_events=False))
    inbox = "mesh.i.v7.i1._inbox-1"
    keys = ["_reply.v7.i1", "_err.v7.i1", "_ctl.v7.*", "_ctl._all.*", "_req.v7.status"]
    refused = ["_reply.v8.i1", "_req.v8.status", "_req.#", "#", "_registry.*"]
    assert await outcomes(
        v7, {k: bind(inbox, "mesh.internal", k, exclusive=True) for k in keys + refused}
    ) == {**dict.fromkeys(keys, "ok"), **dict.fromkeys(refused, "refused")}


async def test_agent_cannot_touch_another_agents_queue(
    login: Login, admin: AbstractChannel
) -> None:
    await admin.declare_queue("mesh.q.v8.b", durable=True)
    v7 = await login(agent_permissions("v7", ["#"]))

    async def consume(channel: AbstractChannel) -> None:
        async def ignore(message: AbstractIncomingMessage) -> None:
            pass

        queue = await channel.declare_queue("mesh.q.v8.b", passive=True)
        await queue.consume(ignore)

    async def get(channel: AbstractChannel) -> None:
        queue = await channel.declare_queue("mesh.q.v8.b", passive=True)
        await queue.get(fail=False)

    async def delete(channel: AbstractChannel) -> None:
        await channel.queue_delete("mesh.q.v8.b")

    async def declare(name: str, channel: AbstractChannel) -> None:
        await channel.declare_queue(name, durable=True)

    async def declare_exchange(channel: AbstractChannel) -> None:
        await channel.declare_exchange("mesh.topic", aio_pika.ExchangeType.TOPIC, durable=True)

    async def passive_exchange(channel: AbstractChannel) -> None:
        await channel.declare_exchange("mesh.topic", passive=True)

    assert await outcomes(
        v7,
        {
            "declare its own": lambda c: declare("mesh.q.v7.b", c),
            "declare another's": lambda c: declare("mesh.q.v8.b", c),
            "declare the gateway's": lambda c: declare(topology.GATEWAY_QUEUE, c),
            "consume another's": consume,
            "get from another's": get,
            "delete another's": delete,
            "bind another's": bind("mesh.q.v8.b", "mesh.topic", "#"),
            "declare an exchange": declare_exchange,
            "declare an exchange passively": passive_exchange,
        },
    ) == {
        "declare its own": "ok",
        "declare another's": "refused",
        "declare the gateway's": "refused",
        "consume another's": "refused",
        "get from another's": "refused",
        "delete another's": "refused",
        "bind another's": "refused",
        "declare an exchange": "refused",
        "declare an exchange passively": "ok",
    }


async def test_retry_copies_only_through_its_own_retry_path(
    login: Login, admin: AbstractChannel
) -> None:
    """An agent declares and uses its own retry path; another agent's it may not touch."""
    await topology.declare_retry_path(admin, "v8", 60_000)
    await topology.declare_requeue_exchange(admin, "v8")
    v7 = await login(agent_permissions("v7", []))

    async def own_path(channel: AbstractChannel) -> None:
        await topology.declare_requeue_exchange(channel, "v7")
        await topology.declare_retry_path(channel, "v7", 60_000)

    async def dead_letter_into_v8(channel: AbstractChannel) -> None:
        await channel.declare_queue(
            "mesh.q.v7.sneak", arguments={"x-dead-letter-exchange": "mesh.q.v8._requeue"}
        )

    assert await outcomes(
        v7,
        {
            "own path": own_path,
            "own": publish("mesh.q.v7._retry", "60000.mesh.q.v7.b"),
            "another's": publish("mesh.q.v8._retry", "60000.mesh.q.v8.b"),
            "requeue own": bind("mesh.q.v7.b", "mesh.q.v7._requeue", "*.mesh.q.v7.b"),
            "requeue another's": bind("mesh.q.v7.b", "mesh.q.v8._requeue", "*.mesh.q.v8.b"),
            "dead-letter into another's": dead_letter_into_v8,
        },
    ) == {
        "own path": "ok",
        "own": "ok",
        "another's": "refused",
        "requeue own": "ok",
        "requeue another's": "refused",
        "dead-letter into another's": "refused",
    }


async def test_operator_tails_and_sends_commands(login: Login, admin: AbstractChannel) -> None:
    operator = await login(operator_permissions())
    tail = f"amq_{uuid.uuid4().hex}"
    inbox = topology.inbox_queue("client-1a2b3c4d", "i1", 1)
    own_replies = topology.reply_key("client-1a2b3c4d", "i1")
    assert await outcomes(
        operator,
        {
            "tail everything": bind(tail, "mesh.topic", "#", exclusive=True),
            "its replies": bind(inbox, "mesh.internal", own_replies, exclusive=True),
            "an agent's replies": bind(inbox, "mesh.internal", "_reply.v7.i1", exclusive=True),
            "ping everyone": publish("mesh.policy.internal", "_ctl._all.ping"),
            "call": publish("mesh.policy.internal", "_req.v7.status"),
            "publish": publish("mesh.policy", "vehicle.v7.speed"),
            "reply as an agent": publish("mesh.policy.internal", "_reply.v8.i1"),
            "skip the gateway": publish("mesh.topic", "vehicle.v7.speed"),
            "declare an agent's queue": bind("mesh.q.v7.b", "mesh.topic", "#"),
        },
    ) == {
        "tail everything": "ok",
        "its replies": "ok",
        "an agent's replies": "refused",
        "ping everyone": "ok",
        "call": "ok",
        "publish": "ok",
        "reply as an agent": "refused",
        "skip the gateway": "refused",
        "declare an agent's queue": "refused",
    }


async def test_an_exchange_of_its_own_cannot_route_into_another_agents_retry_path(
    login: Login, admin: AbstractChannel
) -> None:
    """RabbitMQ's permissions name resources, not kinds, so an agent may declare an exchange
    under its own prefix; with a shared retry exchange as its alternate exchange (or bound
    to it) that once routed any key past the gateway into any agent's queue.  Retry paths
    are per agent now: naming another's as alternate exchange, or binding to it, is refused."""
    await topology.declare_retry_path(admin, "v8", 60_000)
    delay = await admin.get_queue(topology.retry_queue("v8", 60_000), ensure=False)
    v7 = await login(agent_permissions("v7", []))

    async def alternate(channel: AbstractChannel) -> None:
        trap = await channel.declare_exchange(
            "mesh.q.v7.trap", arguments={"alternate-exchange": topology.retry_exchange("v8")}
        )
        await trap.publish(aio_pika.Message(b"{}"), "60000.mesh.q.v8.b")

    async def bound(channel: AbstractChannel) -> None:
        trap = await channel.declare_exchange("mesh.q.v7.trap2")
        target = await channel.get_exchange(topology.retry_exchange("v8"), ensure=False)
        await target.bind(trap, "#")

    assert await outcomes(v7, {"alternate": alternate, "bound": bound}) == {
        "alternate": "refused",
        "bound": "refused",
    }
    assert await delay.get(fail=False) is None


async def test_gateway_relays_with_its_compiled_permissions(
    settings: Settings, users: Users
) -> None:
    """A gateway holding only its compiled permissions declares the topology and relays both
    lanes (the agents still hold every right: they declare exchanges at start today)."""
    url = await users(gateway_permissions())
    gateway = Gateway(settings=settings.model_copy(update={"amqp_url": url}))
    service = Service("svc", settings=settings)  # hears news.#, answers echo
    caller = subscriber(settings, agent_id="caller")
    async with running(gateway, service, caller):
        assert gateway.transport.user != "guest"
        await caller.publish("news.flash", {"n": 1})
        (event,) = await take(service.seen, 1)
        assert await caller.request("svc", "echo", {"x": 1}, timeout=10) == {"x": 1}
    assert event.topic == "news.flash"
    assert event.user_id == "guest"


class Flaky(SubscriberBehaviour):
    retry_delays = (0.05,)

    @on("vehicle.#")
    async def reading(self, msg: Message, payload: object) -> None:
        self.agent.attempts.put_nowait(msg.attempt)  # type: ignore[attr-defined]
        if msg.attempt == 1:
            raise RuntimeError("first attempt fails")


class Restricted(Agent):
    behaviours = [Flaky]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: asyncio.Queue[int] = asyncio.Queue()


async def test_an_agent_runs_under_its_compiled_permissions(
    settings: Settings, users: Users, admin: AbstractChannel
) -> None:
    """Started under ``agent_permissions`` (after the topology exists), an agent checks the
    exchanges instead of declaring them, declares and binds its own queues, publishes through
    the gateway, and retries through a delay queue provisioning declared."""
    gateway = Gateway(settings=settings.model_copy(
        update={"amqp_url": await users(gateway_permissions())}
    ))
    restricted = settings.model_copy(
        update={"amqp_url": await users(agent_permissions("v7", ["vehicle.#"]))}
    )
    v7 = Restricted("v7", settings=restricted)
    async with running(gateway, v7):
        await v7.publish("vehicle.v7.speed", {"kmh": 1})
        assert [await asyncio.wait_for(v7.attempts.get(), 15) for _ in range(2)] == [1, 2]
