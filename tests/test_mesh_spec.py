"""The mesh spec (``mesh.deploy``): what a ``mesh.yaml`` says, every problem with its file,
line and path, the processes it runs as which principals, and their environment."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mesh.deploy import SpecError, load_spec
from mesh.deploy.launch import environment
from mesh.deploy.processes import plan
from mesh.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "examples" / "policy.yaml", tmp_path / "policy.yaml")
    return tmp_path


def spec_at(directory: Path, body: str) -> Path:
    path = directory / "mesh.yaml"
    path.write_text(f"policy: policy.yaml\n{body}")
    return path


def test_the_demo_spec_runs_the_demo_processes_as_their_principals() -> None:
    spec = load_spec(ROOT / "examples" / "demo" / "mesh.yaml")
    assert spec.name == "demo"
    assert spec.policy == ROOT / "examples" / "policy.yaml"
    assert spec.bridge_on
    assert spec.bridge is not None and spec.bridge.token_for == "dashboard"
    processes = plan(spec, load_policy(spec.policy))
    assert [(p.name, p.role, p.principal, p.args) for p in processes] == [
        ("gateway", "gateway", "gateway", ("gateway", "--id", "gateway", "--log-level", "warning")),
        *(
            (agent, "agent", principal, ("run", cls, "--id", agent, "--log-level", "warning"))
            for agent, principal, cls in [
                ("v7", "vehicles", "examples.vehicles:Vehicle"),
                ("v8", "vehicles", "examples.vehicles:Vehicle"),
                ("monitor", "monitor", "examples.vehicles:Monitor"),
                ("v9", "vehicles", "examples.vehicles:Intruder"),
            ]
        ),
        (
            "bridge", "bridge", "bridge",
            ("bridge", "--id", "bridge", "--host", "127.0.0.1", "--port", "8080", "--log-level",
             "warning"),
        ),
    ]


def test_replicas_settings_env_and_the_bridge(directory: Path) -> None:
    spec = load_spec(
        spec_at(
            directory,
            "name: fleet\n"
            "gateway: {replicas: 2, log_level: info}\n"
            "bridge: {port: 9090, host: 0.0.0.0}\n"
            "agents:\n"
            "  - id: v7\n"
            "    class: examples.vehicles:Vehicle\n"
            "    replicas: 2\n"
            "    settings: {prefetch: 10, retry_delays: [0.5, 2], shutdown_timeout: 5}\n"
            "    env: {FLEET: north}\n"
            "    resources: {requests: {cpu: 100m, memory: 64Mi}, limits: {cpu: 1}}\n",
        )
    )
    processes = {p.name: p for p in plan(spec, load_policy(spec.policy))}
    assert list(processes) == ["gateway-1", "gateway-2", "v7-1", "v7-2", "bridge"]
    v7 = processes["v7-2"]
    assert v7.agent == "v7" and v7.principal == "vehicles"
    assert v7.env == {
        "MESH_PREFETCH": "10",
        "MESH_RETRY_DELAYS": "0.5,2",
        "MESH_SHUTDOWN_TIMEOUT": "5",
        "FLEET": "north",
    }
    assert v7.stop_timeout == 15.0
    assert processes["gateway-1"].args[-2:] == ("--log-level", "info")
    assert processes["bridge"].args[:7] == (
        "bridge", "--id", "bridge", "--host", "0.0.0.0", "--port", "9090"
    )
    assert spec.bridge is not None and spec.bridge.url == "http://127.0.0.1:9090/"
    assert spec.agents[0].resources.requests.memory == "64Mi"
    assert spec.agents[0].resources.limits.cpu == "1"


def test_a_process_gets_its_principals_credentials_not_the_callers_settings(
    directory: Path,
) -> None:
    spec = load_spec(spec_at(directory, "gateway: {settings: {prefetch: 7}}\n"))
    gateway = plan(spec, load_policy(spec.policy))[0]
    env = environment(
        gateway,
        inherited={
            "PATH": "/bin",
            "MESH_AMQP_URL": "amqp://admin:secret@h/",
            "MESH_MANAGEMENT_URL": "http://admin:secret@h:15672",
            "MESH_PREFETCH": "1",
        },
        credentials={"MESH_AMQP_URL": "amqp://mesh.gateway:pw@h/", "MESH_NAMESPACE": "mesh"},
        policy=spec.policy,
        audit_key=directory / "audit.key",
    )
    assert env == {
        "PATH": "/bin",
        "MESH_AMQP_URL": "amqp://mesh.gateway:pw@h/",
        "MESH_NAMESPACE": "mesh",
        "MESH_POLICY": str(directory / "policy.yaml"),
        "MESH_AUDIT_KEY_FILE": str(directory / "audit.key"),
        "MESH_PREFETCH": "7",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            "agents:\n  - id: v7\n    class: a:B\n    replicas: -1\n",
            "5: agents[0].replicas: replicas -1 must be 0 or more",
            id="replicas",
        ),
        pytest.param(
            "agents:\n  - id: v7\n    class: nocolon\n",
            "4: agents[0].class: class 'nocolon' is not of the form module:Class",
            id="class",
        ),
        pytest.param(
            "agents:\n  - {id: 'v 7', class: 'a:B'}\n",
            "3: agents[0].id: invalid name 'v 7': use letters, digits, '-' and '_' (not first), "
            "at most 128 characters",
            id="id",
        ),
        pytest.param(
            "agents:\n  - {id: v7, class: 'a:B'}\n  - {id: v7, class: 'a:C'}\n",
            "4: agents[1].id: id 'v7' is agents[0]'s too",
            id="id twice",
        ),
        pytest.param(
            "gateway: {replicas: 0}\n",
            "2: gateway.replicas: replicas 0 must be 1 or more: every message passes a gateway",
            id="no gateway",
        ),
        pytest.param(
            "gateway:\n  settings: {prefetch: 0}\n",
            "3: gateway.settings.prefetch: Input should be greater than or equal to 1, got 0",
            id="setting value",
        ),
        pytest.param(
            "gateway:\n  settings: {amqp_url: 'amqp://x/'}\n",
            "3: gateway.settings.amqp_url: setting 'amqp_url' is set from the principal's "
            "credentials",
            id="reserved setting",
        ),
        pytest.param(
            "gateway:\n  env: {MESH_PREFETCH: '3'}\n",
            "3: gateway.env.MESH_PREFETCH: MESH_PREFETCH is a mesh setting: give it as "
            "settings: {prefetch: …}",
            id="setting as env",
        ),
        pytest.param(
            "gateway:\n  env: {WORKERS: 3}\n",
            "3: gateway.env.WORKERS: expected text, got 3",
            id="env value",
        ),
        pytest.param(
            "gateway:\n  resources: {limits: {memory: 12x}}\n",
            "3: gateway.resources.limits.memory: memory '12x' is no memory quantity (such as "
            "128Mi or 1Gi)",
            id="memory",
        ),
        pytest.param(
            "gateway:\n  resources: {requests: {cpu: 2}, limits: {cpu: 500m}}\n",
            "3: gateway.resources: requests.cpu 2 is more than limits.cpu 500m",
            id="requests over limits",
        ),
        pytest.param(
            "bridge: {port: 70000}\n",
            "2: bridge.port: port 70000 is not between 1 and 65535",
            id="port",
        ),
        pytest.param(
            "log_level: loud\n",
            "2: log_level: unknown log level 'loud' (expected debug, info, warning, error)",
            id="log level",
        ),
        pytest.param(
            "restart: {backoff: 0}\n",
            "2: restart.backoff: backoff 0 must be more than 0",
            id="backoff",
        ),
        pytest.param(
            "policy: other.yaml\n",
            "2: policy: 'policy' appears twice (first at line 1)",
            id="key twice",
        ),
        pytest.param(
            "agents: [\n",
            "3: not valid YAML: expected the node content, but found '<stream end>'",
            id="yaml",
        ),
    ],
)
def test_a_bad_spec_names_the_file_the_line_the_path_and_why(
    directory: Path, body: str, expected: str
) -> None:
    path = spec_at(directory, body)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == f"{path}:{expected}"


def test_a_missing_policy_file_is_named_with_where_it_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    path = tmp_path / "deploy" / "mesh.yaml"
    path.write_text("policy: ../policy.yaml\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == (
        f"{path}:1: policy: no policy file '../policy.yaml' (looked for {tmp_path}/policy.yaml)"
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            "agents:\n  - {id: x9, class: 'a:B'}\n",
            "3: agents[0].id: agent id 'x9' belongs to no principal in {policy}: list it (or a "
            "glob matching it) under a principal of kind agent",
            id="no principal",
        ),
        pytest.param(
            "gateway: {id: monitor}\n",
            "2: gateway.id: agent id 'monitor' belongs to principal 'monitor' in {policy}, of "
            "kind agent; a gateway process needs a principal of kind gateway",
            id="kind",
        ),
        pytest.param(
            "bridge:\n  token_for: monitor\n",
            "3: bridge.token_for: token_for 'monitor' is a principal of kind agent in {policy}; "
            "it takes a principal of kind user (users: dashboard)",
            id="token_for of an agent",
        ),
        pytest.param(
            "bridge: {token_for: nobody}\n",
            "2: bridge.token_for: token_for 'nobody' is no principal in {policy}; it takes a "
            "principal of kind user (users: dashboard)",
            id="token_for of nobody",
        ),
        pytest.param(
            "agents:\n  - {id: v7, class: 'a:B', replicas: 2}\n  - {id: v7-1, class: 'a:B'}\n",
            "4: agents[1].id: process name 'v7-1' is taken (replicas are named <id>-<n>)",
            id="replica names",
        ),
    ],
)
def test_ids_the_policy_does_not_give_the_right_principal_are_named(
    directory: Path, body: str, expected: str
) -> None:
    path = spec_at(directory, body)
    spec = load_spec(path)
    with pytest.raises(SpecError) as caught:
        plan(spec, load_policy(spec.policy))
    assert str(caught.value) == f"{path}:" + expected.format(policy=directory / "policy.yaml")
