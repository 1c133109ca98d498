"""The Kubernetes manifests: deploy/k8s/base, its dev and prod overlays, and what
``mesh k8s render`` writes for a spec, built with ``kubectl kustomize`` and checked against
the Kubernetes schemas (``kubernetes-validate``, offline); the Dockerfile; and the rendered
example agent's command run here as its pod would run it."""

from __future__ import annotations

import asyncio
import base64
import configparser
import os
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
import yaml
from dockerfile_parse import DockerfileParser
from helpers import PrivateRedis, cli_env, eventually, free_port, running
from redis.exceptions import AuthenticationError, NoPermissionError

from behaviours import SubscriberBehaviour
from examples.vehicles import Alert
from mesh import Agent, Message, on
from mesh.config import Settings
from mesh.deploy.k8s import ADMIN, IMAGE, render
from mesh.deploy.spec import load_spec
from mesh.management import ManagementAPI
from mesh.policy import load_policy
from mesh.provision import CredentialStore

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"
"""The Kubernetes version whose schemas the objects must follow (shipped with
kubernetes-validate)."""
DRAIN = Settings().shutdown_timeout
MESH_ROLES = ("gateway", "bridge", "agent")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {exc}") from None


def pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod specs by workload name."""
    return {
        obj["metadata"]["name"]: obj["spec"]["template"]["spec"]
        for obj in objects
        if obj["kind"] in ("Deployment", "StatefulSet", "Job")
    }


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def check_pods(objects: list[dict[str, Any]]) -> None:
    """What every pod must have (issue 14's list)."""
    deployments = by_kind(objects, "Deployment")
    for name, pod in pods(objects).items():
        assert pod["enableServiceLinks"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert {"requests", "limits"} <= container["resources"].keys(), name
            for env in container.get("env", []):
                # Credentials come only from Secrets.
                if env["name"] in ("MESH_AMQP_URL", "MESH_REDIS_URL", "MESH_AUDIT_KEY"):
                    raise AssertionError(f"{name}: {env['name']} given in the manifest")
                if "value" in env:  # no URL with a user and password in it
                    assert "://" not in env["value"] or "@" not in env["value"], (name, env)
        if name == "mesh-provision":
            continue
        container = pod["containers"][0]
        assert "livenessProbe" in container and "readinessProbe" in container, name
        labels = deployments.get(name, {}).get("spec", {}).get("template", {}).get("metadata", {})
        role = labels.get("labels", {}).get("mesh.agentmesh.io/role")
        if role in ("gateway", "agent"):
            env = {e["name"]: e.get("value") for e in container["env"]}
            port = int(env["MESH_HEALTH_PORT"])
            assert container["ports"][0]["containerPort"] == port
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["readinessProbe"]["httpGet"]["port"] == "health"
            assert container["image"].startswith(IMAGE.split(":")[0])
            assert pod["terminationGracePeriodSeconds"] > DRAIN, name
            annotations = deployments[name]["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(port)
            assert annotations["prometheus.io/path"] == "/metrics"
            assert container["envFrom"][0]["secretRef"]["name"].startswith("mesh-credentials-")


@pytest.mark.parametrize("where", ["base", "overlays/dev", "overlays/prod"])
def test_base_and_overlays_follow_the_schemas(where: str) -> None:
    objects = kustomize(K8S / where)
    validate(objects)
    check_pods(objects)
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    assert {
        ("Namespace", "agentmesh"),
        ("StatefulSet", "rabbitmq"),
        ("StatefulSet", "redis"),
        ("Deployment", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("Deployment", "bridge"),
        ("Service", "bridge"),
        ("Ingress", "bridge"),
        ("Deployment", "agent-v7"),
    } <= kinds
    assert all(obj["metadata"].get("namespace", "agentmesh") == "agentmesh" for obj in objects)
    rabbit = by_kind(objects, "StatefulSet")["rabbitmq"]
    config = by_kind(objects, "ConfigMap")["rabbitmq-config"]["data"]
    assert "default_queue_type = quorum" in config["rabbitmq.conf"]
    assert "load_definitions = " in config["rabbitmq.conf"]
    assert "rabbitmq_management" in config["enabled_plugins"]
    assert "rabbitmq_prometheus" in config["enabled_plugins"]
    gateway = by_kind(objects, "Deployment")["gateway"]
    policies = by_kind(objects, "NetworkPolicy")
    assert policies["bridge-from-ingress"]["spec"]["ingress"][0]["from"]
    if where == "overlays/dev":
        assert rabbit["spec"]["replicas"] == 1
    else:
        assert rabbit["spec"]["replicas"] == 3
        assert gateway["spec"]["replicas"] >= 2
    env = {e["name"] for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    if where == "overlays/prod":
        assert "listeners.ssl.default = 5671" in config["rabbitmq.conf"]
        assert "listeners.tcp = none" in config["rabbitmq.conf"]
        assert {"MESH_TLS_CA_FILE", "MESH_TLS_CERT_FILE", "MESH_TLS_KEY_FILE"} <= env
        redis_args = by_kind(objects, "StatefulSet")["redis"]["spec"]["template"]["spec"]
        assert "--tls-port" in redis_args["containers"][0]["args"]
    else:
        assert "MESH_TLS_CA_FILE" not in env


@pytest.fixture
def rendered(tmp_path: Path) -> tuple[Path, CredentialStore]:
    """examples/demo/mesh.yaml rendered on the base, with credentials made offline."""
    credentials = tmp_path / "credentials"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "provision",
            str(ROOT / "examples/policy.yaml"),
            "--no-broker",
            "--credentials",
            str(credentials),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "overlay"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.cli",
            "k8s",
            "render",
            str(ROOT / "examples/demo/mesh.yaml"),
            "-o",
            str(out),
            "--credentials",
            str(credentials),
            "--base",
            str(K8S / "base"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out, CredentialStore(credentials)


def secret_values(objects: list[dict[str, Any]], prefix: str) -> dict[str, str]:
    """The data of the one Secret named ``prefix-<hash>``, decoded."""
    (secret,) = [
        obj
        for obj in objects
        if obj["kind"] == "Secret" and obj["metadata"]["name"].rsplit("-", 1)[0] == prefix
    ]
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_rendered_spec_follows_the_schemas(rendered: tuple[Path, CredentialStore]) -> None:
    out, store = rendered
    objects = kustomize(out)
    validate(objects)
    check_pods(objects)
    deployments = by_kind(objects, "Deployment")
    spec = load_spec(ROOT / "examples/demo/mesh.yaml")
    # One Deployment per agent of the spec; the base's example gone.
    assert "agent-v7" not in deployments
    for agent in spec.agents:
        deployment = deployments[f"mesh-agent-{agent.id}"]
        assert deployment["spec"]["replicas"] == agent.replicas
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:4] == ["run", agent.class_, "--id", agent.id]
    assert deployments["gateway"]["spec"]["replicas"] == spec.gateway.replicas
    # The vehicles' Secret: their principal's credentials, the hosts the cluster's Services.
    vehicles = secret_values(objects, "mesh-credentials-vehicles")
    password, namespace = store.read("vehicles") or ("", "")
    assert vehicles["MESH_AMQP_URL"] == f"amqp://{namespace}.vehicles:{password}@rabbitmq:5672/%2F"
    assert vehicles["MESH_REDIS_URL"] == f"redis://{namespace}.vehicles:{password}@redis:6379/0"
    v7 = deployments["mesh-agent-v7"]["spec"]["template"]["spec"]["containers"][0]
    assert v7["envFrom"][0]["secretRef"]["name"].startswith("mesh-credentials-vehicles-")
    # The Secrets the base names exist, under kustomize's hashed names.
    secrets = {
        obj["metadata"]["name"].rsplit("-", 1)[0] for obj in objects if obj["kind"] == "Secret"
    }
    assert {
        "mesh-credentials-gateway",
        "mesh-credentials-bridge",
        "rabbitmq-definitions",
        "redis-acl",
        "rabbitmq-erlang-cookie",
        "mesh-audit-key",
        "mesh-admin",
    } <= secrets
    # Every Secret and ConfigMap a pod names is one the overlay holds, in its namespace.
    held = {
        (obj["kind"], obj["metadata"]["name"])
        for obj in objects
        if obj["kind"] in ("Secret", "ConfigMap")
        and obj["metadata"].get("namespace") == "agentmesh"
    }
    for name, pod in pods(objects).items():
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert ("Secret", source["secretRef"]["name"]) in held, (name, source)
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ("Secret", ref["name"]) in held, (name, env)
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in held, (name, volume)
            if "configMap" in volume and volume["configMap"]["name"] != "rabbitmq-config":
                assert ("ConfigMap", volume["configMap"]["name"]) in held, (name, volume)
    definitions = secret_values(objects, "rabbitmq-definitions")["definitions.json"]
    assert '"name": "mesh.vehicles"' in definitions and f'"name": "{ADMIN}"' in definitions
    job = by_kind(objects, "Job")["mesh-provision"]["spec"]["template"]["spec"]
    assert "mesh provision /etc/mesh/policy/policy.yaml" in job["containers"][0]["command"][2]


def test_rendered_overlay_on_prod_uses_tls(
    rendered: tuple[Path, CredentialStore], tmp_path: Path
) -> None:
    _, store = rendered
    spec = load_spec(ROOT / "examples/demo/mesh.yaml")
    from mesh.deploy.k8s import Services

    out = tmp_path / "prod"
    render(
        spec,
        load_policy(str(spec.policy)),
        store,
        Settings(),
        out,
        base=K8S / "overlays/prod",
        services=Services(tls=True),
        image="registry.example/mesh:2",
    )
    objects = kustomize(out)
    validate(objects)
    vehicles = secret_values(objects, "mesh-credentials-vehicles")
    assert (
        vehicles["MESH_AMQP_URL"].startswith("amqps://") and ":5671/" in vehicles["MESH_AMQP_URL"]
    )
    assert vehicles["MESH_REDIS_URL"].startswith("rediss://")
    v7 = by_kind(objects, "Deployment")["mesh-agent-v7"]["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert v7["image"] == "registry.example/mesh:2"
    assert "MESH_TLS_CA_FILE" in {e["name"] for e in v7["env"]}


async def test_rendered_redis_acl_file_loads(
    rendered: tuple[Path, CredentialStore], tmp_path: Path
) -> None:
    """Redis starts with the rendered ACL file: each principal logs in with its password and
    reaches only its keys; the default user is off."""
    out, store = rendered
    port = free_port()
    server = PrivateRedis(port, tmp_path)
    server_binary = shutil.which("redis-server")
    if server_binary is None:
        pytest.skip("redis-server is not installed")
    server.process = await asyncio.create_subprocess_exec(
        server_binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--aclfile",
        str(out / "users.acl"),
        "--dir",
        str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    admin_password = (store.directory / "kubernetes" / "admin").read_text().strip()
    admin = aioredis.Redis(port=port, username=ADMIN, password=admin_password)
    try:
        await eventually(lambda: _pings(admin), what="redis-server with the ACL file answers")
        password, namespace = store.read("vehicles") or ("", "")
        vehicles = aioredis.Redis(port=port, username=f"{namespace}.vehicles", password=password)
        assert await vehicles.set(f"{namespace}:state:v7", "x")
        with pytest.raises(NoPermissionError):
            await vehicles.get(f"{namespace}:state:monitor")
        await vehicles.aclose()
        anonymous = aioredis.Redis(port=port)
        with pytest.raises((AuthenticationError, NoPermissionError)):
            await anonymous.get("anything")
        await anonymous.aclose()
    finally:
        await admin.aclose()
        await server.kill()


async def _pings(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except Exception:
        return False


def test_dockerfile_is_what_the_manifests_run() -> None:
    dockerfile = DockerfileParser(str(ROOT / "Dockerfile"))
    assert dockerfile.baseimage.startswith("python:3.11-slim")
    instructions = [(i["instruction"], i["value"]) for i in dockerfile.structure]
    values = dict(instructions)
    assert yaml.safe_load(values["ENTRYPOINT"]) == ["mesh"]
    uid, gid = values["USER"].split(":")
    objects = kustomize(K8S / "base")
    for name, pod in pods(objects).items():
        if pod["containers"][0]["image"].startswith("agentmesh"):
            # The image's user is the one the pods run as; their args are mesh's.
            assert pod["securityContext"]["runAsUser"] == int(uid), name
            assert pod["securityContext"]["runAsGroup"] == int(gid), name
            assert pod["containers"][0]["args"][0] in ("run", "gateway", "bridge"), name
            assert "command" not in pod["containers"][0], name
    assert values["WORKDIR"] == "/app"
    assert dockerfile.envs["PYTHONUNBUFFERED"] == "1"
    # The dependencies' layer comes from the package metadata alone, before the code.
    copies = [v for i, v in instructions if i == "COPY"]
    assert copies[0] == "setup.cfg pyproject.toml ./"
    order = [i for i, _ in instructions if i in ("COPY", "RUN")]
    assert order[:3] == ["COPY", "RUN", "COPY"]
    # What that layer installs is the package's install_requires.
    run = next(v for i, v in instructions if i == "RUN")
    command = shlex.split(run.split(">", 1)[0])
    listed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    requires = [
        line.split("#")[0].strip()
        for line in config["options"]["install_requires"].splitlines()
        if line.split("#")[0].strip()
    ]
    assert listed == requires and "aio-pika>=9.4,<11" in listed


class Collector(SubscriberBehaviour):
    """Every speeding alert the monitor raises, by speed (each reading's own)."""

    @on("alerts.speeding.*", model=Alert)
    async def alert(self, msg: Message, alert: Alert) -> None:
        assert isinstance(self.agent, Vehicle1)
        self.agent.alerts.add(alert.speed_kmh)


class Vehicle1(Agent):
    behaviours = [Collector]

    def __init__(self, settings: Settings) -> None:
        super().__init__("v1", settings=settings)
        self.alerts: set[float] = set()


class LocalPod:
    """A container of the rendered manifests run here, as its pod would run it: the image's
    entrypoint ``mesh`` with the container's args, its Secret's variables and its own env.
    The differences, and only these: the cluster's service hosts (``rabbitmq``, ``redis``)
    become the test's broker and Redis; the mounted files (policy, audit key) are their
    local copies; and ``health_port`` when given (two pods here would share 9090)."""

    def __init__(
        self,
        objects: list[dict[str, Any]],
        deployment: str,
        settings: Settings,
        files: dict[str, str],
        health_port: int | None = None,
    ) -> None:
        pod = by_kind(objects, "Deployment")[deployment]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        self.container = container
        self.grace = pod["terminationGracePeriodSeconds"]
        secret = container["envFrom"][0]["secretRef"]["name"].rsplit("-", 1)[0]
        env = secret_values(objects, secret)
        env.update({e["name"]: e["value"] for e in container.get("env", [])})
        amqp, redis_url = urlsplit(settings.amqp_url), urlsplit(settings.redis_url)
        hosts = {
            "rabbitmq:5672": f"{amqp.hostname}:{amqp.port or 5672}",
            "redis:6379": f"{redis_url.hostname}:{redis_url.port or 6379}",
        }
        for variable in ("MESH_AMQP_URL", "MESH_REDIS_URL"):
            for service, address in hosts.items():
                env[variable] = env[variable].replace(f"@{service}/", f"@{address}/")
        for variable, path in files.items():
            env[variable] = path
        if health_port is not None:
            env["MESH_HEALTH_PORT"] = str(health_port)
        self.env = env
        self.port = int(env["MESH_HEALTH_PORT"])
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert "command" not in self.container  # the image's entrypoint: mesh
        keep = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mesh.cli",
            *self.container["args"],
            cwd=ROOT,
            env={**keep, **self.env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    async def ready(self) -> bool:
        assert self.process is not None and self.process.returncode is None, "exited"
        probe = self.container["readinessProbe"]["httpGet"]
        assert probe["port"] == "health" and self.container["ports"][0]["name"] == "health"
        status, _ = await asyncio.to_thread(self.get, probe["path"])
        return status == 200

    async def terminate(self) -> int:
        """SIGTERM, as the kubelet sends it; the exit code within the grace period."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), self.grace)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def test_the_rendered_agent_runs_here_as_in_its_pod(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """The gateway and the monitor run from their rendered Deployments, on the real broker
    provisioned from the policy; the monitor gets ready on the declared probe, serves
    /metrics, and, stopped with SIGTERM in the middle of a stream of readings and started
    again, loses none of them (each becomes its alert) and exits 0 both times."""
    shutil.copy(ROOT / "examples/policy.yaml", tmp_path / "policy.yaml")
    (tmp_path / "mesh.yaml").write_text(
        "name: test\npolicy: policy.yaml\n"
        "agents:\n  - {id: monitor, class: 'examples.vehicles:Monitor'}\n"
        "bridge: {enabled: false}\n"
    )
    credentials = tmp_path / "credentials"
    env = {**os.environ, **cli_env(settings), "MESH_CREDENTIALS_DIR": str(credentials)}
    pods_here: list[LocalPod] = []
    try:
        for args in (
            ["provision", str(tmp_path / "policy.yaml")],
            [
                "k8s",
                "render",
                str(tmp_path / "mesh.yaml"),
                "-o",
                str(tmp_path / "overlay"),
                "--base",
                str(K8S / "base"),
            ],
        ):
            result = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "mesh.cli", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert result.returncode == 0, result.stdout + result.stderr
        objects = kustomize(tmp_path / "overlay")
        files = {"MESH_POLICY": str(tmp_path / "policy.yaml")}
        gateway = LocalPod(
            objects,
            "gateway",
            settings,
            {**files, "MESH_AUDIT_KEY_FILE": str(credentials / "audit.key")},
            health_port=free_port(),
        )
        monitor = LocalPod(objects, "mesh-agent-monitor", settings, files)
        pods_here += [gateway, monitor]
        await gateway.start()
        await eventually(gateway.ready, timeout=60, what="the gateway is ready")
        await monitor.start()
        await eventually(monitor.ready, timeout=60, what="the monitor is ready")
        status, metrics = await asyncio.to_thread(monitor.get, "/metrics")
        assert status == 200 and "# TYPE" in metrics

        store = CredentialStore(credentials)
        vehicle_env = store.variables("vehicles") or {}
        vehicle = Vehicle1(
            settings.model_copy(
                update={
                    "amqp_url": vehicle_env["MESH_AMQP_URL"],
                    "redis_url": vehicle_env["MESH_REDIS_URL"],
                    "policy": str(tmp_path / "policy.yaml"),
                }
            )
        )
        speeds: list[float] = []
        stopped = asyncio.Event()
        async with running(vehicle):

            async def stream() -> None:
                """Readings one after the other, on while the monitor drains and is gone,
                and 20 more once it has exited."""
                after = 0
                while after < 20:
                    speed = 130.0 + len(speeds)
                    await vehicle.publish(
                        "vehicle.v1.speed",
                        {"vehicle": "v1", "speed_kmh": speed},
                        schema="reading@1",
                    )
                    speeds.append(speed)
                    after += stopped.is_set()
                    await asyncio.sleep(0.005)  # a stream, not a burst

            streaming = asyncio.create_task(stream())
            await eventually(lambda: len(vehicle.alerts) >= 10, timeout=30, what="alerts flow")
            code = await monitor.terminate()
            stopped.set()
            assert code == 0
            await streaming
            assert len(vehicle.alerts) < len(speeds)  # some were left for the next instance
            await monitor.start()
            await eventually(monitor.ready, timeout=60, what="the monitor is ready again")
            await eventually(
                lambda: vehicle.alerts >= set(speeds),
                timeout=60,
                what=f"all {len(speeds)} readings handled",
            )
        assert await monitor.terminate() == 0
        assert await gateway.terminate() == 0
    finally:
        for pod in pods_here:
            await pod.kill()
        api = ManagementAPI.for_settings(settings)
        for user in await api.users():
            if user.name.startswith(f"{settings.namespace}."):
                await api.delete_user(user.name)
        for name in await redis.acl_users():
            if name.startswith(f"{settings.namespace}."):
                await redis.acl_deluser(name)
