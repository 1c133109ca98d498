"""``mesh provision``: the plan, passwords and credentials alone, then on the broker.

Each broker test has a vhost and a namespace of its own, so the users it provisions
(``<namespace>.<principal>``) are its own; they are deleted afterwards, pass or fail.
"""

from __future__ import annotations

import asyncio
import json
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest
import redis.asyncio as aioredis
from agents_reliability import host, subscriber
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import ChannelAccessRefused
from click.testing import CliRunner, Result
from helpers import running
from hypothesis import assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from behaviours import SubscriberBehaviour
from mesh import Message, Settings, on, topology
from mesh.cli import main
from mesh.devservices import with_vhost
from mesh.gateway import Gateway
from mesh.management import ManagementAPI, PermissionInfo, vhost_of
from mesh.policy import globs, parse_policy
from mesh.policy.permissions import agent_permissions, shared_agent_permissions
from mesh.provision import (
    Credentials,
    CredentialStore,
    ProvisionError,
    build_plan,
    diff,
    managed_tags,
)
from mesh.provision.passwords import SHA256, matches, password_hash

POLICY = """\
principals:
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
  monitor: {kind: agent}
  gateway: {kind: gateway}
  bridge: {kind: bridge}
  mesh-cli: {kind: operator, agents: ["client-*"]}
  dashboard: {kind: user}
rule_sets:
  main:
    rules:
      - allow: publish
        who: vehicles
        topics: "vehicle.{self}.#"
      - allow: subscribe
        who: vehicles
        topics: "vehicle.{self}.cmd"
      - allow: subscribe
        who: [monitor, dashboard]
        topics: "vehicle.#"
      - allow: subscribe
        who: mesh-cli
        topics: ["#", "inbox.{self}"]
"""
PRINCIPALS = ("vehicles", "monitor", "gateway", "bridge", "mesh-cli")
"""Those of POLICY with a broker user (dashboard is a token user)."""


# --- without a broker -------------------------------------------------------------------


def test_password_hash_is_rabbitmqs() -> None:
    """The worked example of RabbitMQ's password guide, and the check of a stored hash."""
    stored = password_hash("test12", bytes.fromhex("908DC60A"))
    assert stored == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
    assert matches("test12", stored, SHA256)
    assert not matches("test13", stored, SHA256)
    assert not matches("test12", stored, "rabbit_password_hashing_bcrypt")
    assert not matches("test12", "not base64!", SHA256)


def test_glob_principal_shares_one_user_among_its_agents_only() -> None:
    """Queues and keys of every id the glob matches, none of an id listed elsewhere, and
    {self} as any of them."""
    shared = shared_agent_permissions(
        ["v[0-9]*"], ["vehicle.{self}.cmd"], excluding=["v99"], registry_events=False
    )
    topics = {t.exchange: t for t in shared.topics}
    cases = [
        (shared.configure, "mesh.q.v7.tracker", True),
        (shared.configure, "mesh.i.v12.i1._inbox-1", True),
        (shared.configure, "mesh.q.v99.tracker", False),
        (shared.configure, "mesh.q.v.tracker", False),
        (shared.configure, "mesh.q.w7.tracker", False),
        (shared.configure, "mesh.q.monitor.tracker", False),
        (topics["mesh.topic"].read, "vehicle.v7.cmd", True),
        (topics["mesh.topic"].read, "vehicle.v8.cmd", True),  # {self}: any of them
        (topics["mesh.topic"].read, "vehicle.*.cmd", False),
        (topics["mesh.topic"].read, "vehicle.v99.cmd", False),
        (topics["mesh.topic"].read, "vehicle.monitor.cmd", False),
        (topics["mesh.internal"].read, "_req.v7.status", True),
        (topics["mesh.internal"].read, "_ctl._all.*", True),
        (topics["mesh.internal"].read, "_req.v99.status", False),
        (topics["mesh.internal"].read, "_req.*.status", False),
        (shared.configure, "mesh.q.v7._retry", True),  # its own retry path
        (shared.configure, "mesh.q.v99._retry", False),
    ]
    assert [(k, re.search(r, k) is not None) for r, k, _ in cases] == [(k, a) for _, k, a in cases]
    assert "{" not in "".join(t.read + t.write for t in shared.topics)  # RabbitMQ expands {…}


_ID = st.text(alphabet="ab1_-", min_size=1, max_size=5).map(lambda s: "a" + s)
_GLOB = st.lists(
    st.sampled_from(["a", "b", "1", "_", "-", "*", "?", "[ab]", "[!a]", "[0-9]"]),
    min_size=1,
    max_size=5,
).map("".join)


@hypothesis_settings(max_examples=300, deadline=None)
@given(_GLOB, _ID)
def test_a_globs_queues_are_those_of_the_ids_it_matches(glob: str, agent: str) -> None:
    """The compiled glob admits an agent's queues exactly when fnmatch matches its id."""
    assume(globs.is_glob(glob) or glob[0].isalnum())  # else no agent id at all
    configure = shared_agent_permissions([glob], []).configure
    assert (re.search(configure, f"mesh.q.{agent}.b") is not None) is globs.matches(glob, agent)


def test_plan_of_a_policy() -> None:
    """One user per connecting principal, the namespace in name and tags; a single agent
    id gets exactly agent_permissions; the bridge binds what its users may."""
    policy = parse_policy(POLICY)
    plan = build_plan(policy, "fleet", "/")
    users = {u.principal.name: u for u in plan.users}
    assert list(users) == list(PRINCIPALS)
    assert users["monitor"].name == "fleet.monitor"
    assert users["monitor"].tags == ("mesh-managed", "mesh-namespace:fleet")
    assert users["mesh-cli"].tags == ("mesh-managed", "mesh-namespace:fleet", "management")
    monitor = agent_permissions("monitor", policy.enforced_subscriptions("monitor"))
    assert users["monitor"].permissions == monitor
    bridge_binds = {t.exchange: t.read for t in users["bridge"].permissions.topics}["mesh.topic"]
    assert re.search(bridge_binds, "vehicle.#")  # dashboard's
    assert re.search(users["bridge"].permissions.read, "mesh.dead")  # GET /dead
    assert not re.search(users["monitor"].permissions.read, "mesh.dead")
    assert [n.split(":")[0] for n in plan.notes] == ["principal 'vehicles'", "principal 'mesh-cli'"]
    assert "share one broker user" in plan.notes[0]
    assert "inbox.{self} not provisioned" in plan.notes[1]


def test_a_gateway_is_one_agent_id() -> None:
    policy = parse_policy("principals:\n  gw: {kind: gateway, agents: ['gateway-*']}\n")
    with pytest.raises(ProvisionError, match="must name one agent id"):
        build_plan(policy, "fleet", "/")


def test_credentials_of_another_mesh_are_refused(tmp_path: Path) -> None:
    """One credentials directory per namespace: a file of another is not overwritten."""
    store = CredentialStore(tmp_path / "creds")
    store.save(Credentials("monitor", "other.monitor", "pw", "amqp://h/", "other"))
    plan = build_plan(parse_policy(POLICY), "fleet", "/")
    with pytest.raises(ProvisionError, match="mesh namespace 'other', not 'fleet'"):
        diff(plan, store, "amqp://h/", None)


# --- on the broker ---------------------------------------------------------------------


@pytest.fixture
def others() -> list[str]:
    """Users of other namespaces a test makes: the ``api`` fixture deletes them."""
    return []


@pytest.fixture
async def api(
    settings: Settings, others: list[str], redis: aioredis.Redis
) -> AsyncIterator[ManagementAPI]:
    """The management API; every broker and Redis user of the test's namespace, and
    ``others``, are deleted afterwards."""
    management = ManagementAPI.for_settings(settings)
    yield management
    for user in await management.users():
        if user.name.startswith(f"{settings.namespace}.") or user.name in others:
            await management.delete_user(user.name)
    for name in await redis.acl_users():
        if name.startswith(f"{settings.namespace}.") or name in others:
            await redis.acl_deluser(name)


def write_policy(directory: Path, text: str = POLICY) -> Path:
    path = directory / "policy.yaml"
    path.write_text(text)
    return path


async def mesh_provision(settings: Settings, *args: str | Path) -> Result:
    """``mesh provision ARGS`` as an administrator of the test's vhost and namespace."""
    env = {
        "MESH_AMQP_URL": settings.amqp_url,
        "MESH_REDIS_URL": settings.redis_url,
        "MESH_NAMESPACE": settings.namespace,
    }
    if settings.management_url:
        env["MESH_MANAGEMENT_URL"] = settings.management_url
    # In a thread: the command runs an event loop of its own.
    return await asyncio.to_thread(
        CliRunner().invoke, main, ["provision", *map(str, args)], env=env
    )


def changes(result: Result) -> list[str]:
    """The change lines of the output (not notes, not the closing line)."""
    assert result.exit_code == 0, result.output
    return [
        line
        for line in result.output.splitlines()
        if not line.startswith("note: ")
        and line not in ("nothing to change", "dry run: nothing changed")
    ]


def amqp_url(credentials: Path, principal: str) -> str:
    return variable(credentials, principal, "MESH_AMQP_URL")


def variable(credentials: Path, principal: str, name: str) -> str:
    (line,) = [
        line
        for line in (credentials / f"{principal}.env").read_text().splitlines()
        if line.startswith(f"{name}=")
    ]
    return line.removeprefix(f"{name}=")


async def refused(connection: AbstractConnection, exchange: str, key: str) -> bool:
    """Whether the broker refuses a publish to ``exchange`` (it closes the channel)."""
    channel = await connection.channel()
    try:
        async with asyncio.timeout(5):
            target = await channel.get_exchange(exchange, ensure=False)
            await target.publish(aio_pika.Message(b"{}"), key)
    except ChannelAccessRefused:
        return True
    await channel.close()
    return False


async def bind_refused(connection: AbstractConnection, queue: str, key: str) -> bool:
    channel = await connection.channel()
    try:
        async with asyncio.timeout(5):
            declared = await channel.declare_queue(queue, auto_delete=True)
            await declared.bind(topology.TOPIC_EXCHANGE, key)
    except ChannelAccessRefused:
        return True
    await channel.close()
    return False


async def test_provision_creates_users_with_tags_and_permissions(
    settings: Settings, api: ManagementAPI, tmp_path: Path
) -> None:
    policy, credentials = write_policy(tmp_path), tmp_path / "creds"
    result = await mesh_provision(settings, policy, "--credentials", credentials)
    ns, vhost = settings.namespace, vhost_of(settings)
    assert f"create user {ns}.vehicles (principal vehicles, agent, agents v[0-9]*;" in (
        result.output
    )
    assert changes(result)

    users = {u.name: u for u in await api.users() if u.name.startswith(f"{ns}.")}
    assert sorted(users) == sorted(f"{ns}.{p}" for p in PRINCIPALS)  # none for dashboard
    plan = build_plan(parse_policy(POLICY), ns, vhost)
    permissions = {p.user: p for p in await api.permissions(vhost)}
    topic_permissions = await api.topic_permissions(vhost)
    for user in plan.users:
        assert users[user.name].tags == user.tags
        p = user.permissions
        assert permissions[user.name] == PermissionInfo(user.name, p.configure, p.write, p.read)
        held = {(t.exchange, t.write, t.read) for t in topic_permissions if t.user == user.name}
        assert held == {(t.exchange, t.write, t.read) for t in p.topics}
    assert "management" in users[f"{ns}.mesh-cli"].tags
    queues = {q.name for q in await api.queues(vhost)}
    assert {"mesh.gateway", "mesh.dead", "mesh.dead.incoming"} <= queues
    assert {"mesh.policy", "mesh.topic", "mesh.dead.filing"} <= set(await api.exchanges(vhost))

    assert stat.S_IMODE(credentials.stat().st_mode) == 0o700
    assert (credentials / ".gitignore").read_text() == "*\n"
    for principal in PRINCIPALS:
        path = credentials / f"{principal}.env"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        url = urlsplit(amqp_url(credentials, principal))
        assert (url.username, url.path) == (f"{ns}.{principal}", urlsplit(settings.amqp_url).path)
        assert f"MESH_NAMESPACE={ns}\n" in path.read_text()
        user = users[f"{ns}.{principal}"]
        assert url.password and matches(url.password, user.password_hash, user.hashing_algorithm)
    assert sorted(p.name for p in credentials.iterdir()) == sorted(
        [".gitignore", *(f"{p}.env" for p in PRINCIPALS)]
    )


async def test_rerun_changes_nothing_and_keeps_passwords(
    settings: Settings, api: ManagementAPI, tmp_path: Path
) -> None:
    policy, credentials = write_policy(tmp_path), tmp_path / "creds"
    changes(await mesh_provision(settings, policy, "--credentials", credentials))
    files = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in credentials.iterdir()}
    hashes = {u.name: u.password_hash for u in await api.users()}

    again = await mesh_provision(settings, policy, "--credentials", credentials)
    assert changes(again) == []
    assert again.output.splitlines()[-1] == "nothing to change"
    assert {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in credentials.iterdir()} == files
    assert {u.name: u.password_hash for u in await api.users()} == hashes


async def test_removed_principal_is_deleted_and_no_other_user_touched(
    settings: Settings, api: ManagementAPI, others: list[str], tmp_path: Path
) -> None:
    """The next run deletes the user of a principal the policy dropped; a user without the
    tags, with only the mesh-managed tag, or of another namespace, is left as it is."""
    ns = settings.namespace
    other = f"{ns}-other"
    others.append(f"{other}.monitor")
    await api.put_user(f"{ns}.stranger", "pw")
    await api.put_user(f"{ns}.by-hand", "pw", ["mesh-managed"])
    await api.put_user(f"{other}.monitor", "pw", managed_tags(other))
    before = {u.name: u for u in await api.users()}
    policy, credentials = write_policy(tmp_path), tmp_path / "creds"
    changes(await mesh_provision(settings, policy, "--credentials", credentials))

    write_policy(
        tmp_path,
        POLICY.replace("  monitor: {kind: agent}\n", "").replace(
            "[monitor, dashboard]", "[dashboard]"
        ),
    )
    result = await mesh_provision(settings, policy, "--credentials", credentials)
    assert changes(result) == [
        f"delete user {ns}.monitor (no principal of the policy is it any more)",
        f"delete redis user {ns}.monitor (no principal of the policy is it any more)",
        f"remove credentials {credentials / 'monitor.env'} (principal monitor has no user now)",
    ]
    after = {u.name: u for u in await api.users()}
    assert f"{ns}.monitor" not in after
    assert f"{ns}.vehicles" in after
    for name in (f"{ns}.stranger", f"{ns}.by-hand", f"{other}.monitor"):
        assert after[name] == before[name]
    assert not (credentials / "monitor.env").exists()


async def test_a_user_of_the_plans_name_not_ours_stops_everything(
    settings: Settings, api: ManagementAPI, tmp_path: Path
) -> None:
    await api.put_user(f"{settings.namespace}.monitor", "pw", ["administrator"])
    credentials = tmp_path / "creds"
    result = await mesh_provision(settings, write_policy(tmp_path), "--credentials", credentials)
    assert result.exit_code == 1
    assert (
        f"broker user {settings.namespace}.monitor exists and is not one mesh namespace "
        f"'{settings.namespace}' provisioned (tags: administrator)"
    ) in result.output
    users = [u.name for u in await api.users() if u.name.startswith(f"{settings.namespace}.")]
    assert users == [f"{settings.namespace}.monitor"]
    assert not credentials.exists()


async def test_dry_run_prints_the_changes_and_makes_none(
    settings: Settings, api: ManagementAPI, redis: aioredis.Redis, tmp_path: Path
) -> None:
    ns, vhost = settings.namespace, vhost_of(settings)
    policy, credentials = write_policy(tmp_path), tmp_path / "creds"
    dry = await mesh_provision(settings, policy, "--credentials", credentials, "--dry-run")
    lines = changes(dry)
    assert f"write credentials {credentials / 'vehicles.env'} (a new password)" in lines
    assert f"set permissions of {ns}.gateway on vhost {vhost}: configure ^(?:" in dry.output
    assert dry.output.splitlines()[-1] == "dry run: nothing changed"
    assert not [u for u in await api.users() if u.name.startswith(f"{ns}.")]
    assert not credentials.exists()

    # Once provisioned, only what drifted: a topic permission and a password set by hand.
    changes(await mesh_provision(settings, policy, "--credentials", credentials))
    await api.set_topic_permissions(vhost, f"{ns}.monitor", "mesh.topic", "", ".*")
    await api.put_user(f"{ns}.gateway", "guessed", managed_tags(ns))
    await redis.execute_command("ACL", "SETUSER", f"{ns}.monitor", "~*")
    drift = [
        f"update user {ns}.gateway: the password of its credentials file (the broker held another)",
        f"update redis user {ns}.monitor: its keys or commands",
        f"set topic permissions of {ns}.monitor on mesh.topic: write ^(?!)$ read "
        r"^(?:vehicle(?:\.(?:[A-Za-z0-9_-]+|\*|#))*)$",
    ]
    dry = await mesh_provision(settings, policy, "--credentials", credentials, "--dry-run")
    assert sorted(changes(dry)) == sorted(drift)
    dry = await mesh_provision(settings, policy, "--credentials", credentials, "--dry-run")
    assert sorted(changes(dry)) == sorted(drift)  # still: the dry run changed nothing
    assert sorted(
        changes(await mesh_provision(settings, policy, "--credentials", credentials))
    ) == (sorted(drift))
    assert changes(await mesh_provision(settings, policy, "--credentials", credentials)) == []


async def test_an_agent_connects_with_its_credentials(
    settings: Settings, api: ManagementAPI, tmp_path: Path
) -> None:
    """v7 connects as the vehicles user from vehicles.env to the exchanges provisioning
    declared: it publishes through the gateway's exchange only, and binds what {self} allows
    a vehicle."""
    credentials = tmp_path / "creds"
    changes(await mesh_provision(settings, write_policy(tmp_path), "--credentials", credentials))
    connection = await aio_pika.connect(amqp_url(credentials, "vehicles"))
    async with connection:
        assert not await refused(connection, "mesh.policy", "vehicle.v7.speed")
        assert await refused(connection, "mesh.topic", "vehicle.v7.speed")
        assert not await bind_refused(connection, "mesh.q.v7.cmd", "vehicle.v7.cmd")
        assert await bind_refused(connection, "mesh.q.v7.cmd", "vehicle.*.cmd")
        assert await bind_refused(connection, "mesh.q.monitor.cmd", "vehicle.v7.cmd")


class Watch(SubscriberBehaviour):
    @on("vehicle.#")
    async def reading(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


async def test_a_provisioned_mesh_relays_under_its_users(
    settings: Settings, api: ManagementAPI, tmp_path: Path
) -> None:
    """The gateway enforcing the policy, the monitor and v7, each under the user provisioned
    for its principal: v7's reading reaches the monitor, sent as the vehicles user."""
    policy, credentials = write_policy(tmp_path), tmp_path / "creds"
    changes(await mesh_provision(settings, policy, "--credentials", credentials))

    def under(principal: str) -> Settings:
        urls = {
            "amqp_url": amqp_url(credentials, principal),
            "redis_url": variable(credentials, principal, "MESH_REDIS_URL"),
        }
        return settings.model_copy(update=urls)

    gateway = Gateway(settings=under("gateway").model_copy(update={"policy": str(policy)}))
    monitor = subscriber(under("monitor"), Watch, agent_id="monitor")
    v7 = subscriber(under("vehicles"), agent_id="v7")
    async with running(gateway, monitor, v7):
        await v7.publish("vehicle.v7.speed", {"kmh": 1})
        reading = await asyncio.wait_for(monitor.seen.get(), 15)
    assert (reading.topic, reading.user_id) == (
        "vehicle.v7.speed",
        f"{settings.namespace}.vehicles",
    )


async def test_definitions_import_into_a_fresh_vhost(
    settings: Settings, api: ManagementAPI, tmp_path: Path
) -> None:
    """Written without a broker, imported through the management API: the users log in with
    their kept passwords, the mesh declares its topology over it unchanged, and
    provisioning that vhost finds nothing to change."""
    fresh = settings.model_copy(
        update={"amqp_url": with_vhost(settings.amqp_url, f"{vhost_of(settings)}-defs")}
    )
    policy, credentials = write_policy(tmp_path), tmp_path / "creds"
    definitions = tmp_path / "out" / "definitions.json"
    offline = ["--credentials", credentials, "--definitions", definitions, "--no-broker"]
    result = await mesh_provision(fresh, policy, *offline)
    assert changes(result)[-1] == f"write definitions {definitions}"
    assert stat.S_IMODE(definitions.stat().st_mode) == 0o600
    assert changes(await mesh_provision(fresh, policy, *offline)) == []  # the same file
    try:
        await api.call("POST", "definitions", json.loads(definitions.read_text()))
        await api.set_permissions(vhost_of(fresh), api.user, ".*", ".*", ".*")
        async with await aio_pika.connect(amqp_url(credentials, "vehicles")) as vehicle:
            assert not await refused(vehicle, "mesh.policy", "vehicle.v7.speed")
            assert await refused(vehicle, "mesh.topic", "vehicle.v7.speed")
        async with await aio_pika.connect(fresh.amqp_url) as connection:
            # Each declared as the definitions made it (a difference closes the channel).
            channel = await connection.channel()
            await topology.declare_exchanges(channel)
            await topology.declare_dead_letter_stream(
                await connection.channel(), fresh.dead_letter_max_bytes, fresh.dead_letter_max_age
            )
        again = await mesh_provision(fresh, policy, "--credentials", credentials)
        # Redis users are not in a broker's definitions: they are all that is left to make.
        assert changes(again) == [
            f"create redis user {fresh.namespace}.{p} (principal {p})" for p in PRINCIPALS
        ]
    finally:
        await api.delete_vhost(vhost_of(fresh))


async def test_it_runs_as_a_broker_administrator(
    settings: Settings, api: ManagementAPI, tmp_path: Path
) -> None:
    """An operator's user (tag management, no more) may list queues, not provision."""
    policy, credentials = write_policy(tmp_path), tmp_path / "creds"
    changes(await mesh_provision(settings, policy, "--credentials", credentials))
    operator = urlsplit(amqp_url(credentials, "mesh-cli"))
    base = urlsplit(settings.management_url or "http://127.0.0.1:15672/")
    as_operator = settings.model_copy(
        update={
            "management_url": base._replace(
                netloc=f"{operator.netloc.rsplit('@', 1)[0]}@{base.netloc.rsplit('@', 1)[-1]}"
            ).geturl()
        }
    )
    result = await mesh_provision(as_operator, policy, "--credentials", credentials)
    assert result.exit_code == 1
    assert "mesh provision runs as a broker administrator" in result.output
