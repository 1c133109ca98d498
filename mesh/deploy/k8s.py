"""A mesh spec as Kubernetes objects: a kustomize overlay on ``deploy/k8s/base``.

``render`` writes, for the processes ``processes.plan`` makes of a spec: one Deployment per
agent (its replicas, its principal's credentials, the health port's probes, the drain's
grace period), the gateway's replicas, the bridge on or off; the Secrets of each principal's
credentials (``mesh provision``'s ``<principal>.env``, their hosts the cluster's services), the
RabbitMQ definitions and the Redis ACL file compiled from the policy, the administrator's
credentials, and a Job that runs ``mesh provision`` against the management API: RabbitMQ
imports definitions only at boot, so an agent added to a running cluster gets its users
from the Job.  Secrets of the cluster itself (the administrator's passwords, the Erlang
cookie) are made once and kept beside the credentials, in ``kubernetes/``.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from mesh.config import Settings
from mesh.deploy.launch import audit_key
from mesh.deploy.processes import Process, plan
from mesh.deploy.spec import AgentSpec, MeshSpec, ResourcesSpec
from mesh.management import vhost_of
from mesh.policy import Policy
from mesh.provision import CredentialStore, ProvisionError, build_plan, definitions, dumps
from mesh.provision.credentials import write_private
from mesh.provision.objects import mesh_objects
from mesh.provision.passwords import SHA256, password_hash, stable_salt

IMAGE = "agentmesh:latest"
"""The image the base's Deployments run (the repository's ``Dockerfile``)."""
NAMESPACE = "agentmesh"
"""The base's namespace."""
HEALTH_PORT = 9090
"""``MESH_HEALTH_PORT`` in every pod: probes and Prometheus read it."""
POLICY_PATH = "/etc/mesh/policy/policy.yaml"
TLS_PATH = "/etc/mesh/tls"
CLIENT_TLS_SECRET = "mesh-client-tls"
"""The prod overlay's client certificate (``tls.crt``, ``tls.key``, ``ca.crt``)."""
ADMIN = "mesh-admin"
"""The broker and Redis administrator the provisioning Job runs as."""
EXAMPLE_AGENT = "agent-v7"
"""The base's example agent, replaced by the spec's agents."""
CLUSTER_DIR = "kubernetes"
"""Beside the credentials: the cluster's own secrets, made once."""
SECRET_FILES = (
    "credentials/",
    "admin.env",
    "definitions.json",
    "users.acl",
    "erlang.cookie",
    "audit.key",
)
"""What an overlay holds that must not be committed (its .gitignore lists them)."""
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"cpu": "500m", "memory": "256Mi"},
}


@dataclass(frozen=True)
class Services:
    """Where the cluster's RabbitMQ and Redis are (the base's Services), and whether TLS."""

    rabbitmq: str = "rabbitmq"
    redis: str = "redis"
    tls: bool = False

    def amqp_url(self, user: str, password: str, vhost: str) -> str:
        scheme, port = ("amqps", 5671) if self.tls else ("amqp", 5672)
        return f"{scheme}://{_auth(user, password)}@{self.rabbitmq}:{port}/{quote(vhost, safe='')}"

    def redis_url(self, user: str, password: str) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{_auth(user, password)}@{self.redis}:6379/0"

    @property
    def management_url(self) -> str:
        return f"http://{self.rabbitmq}:15672/"


def k8s_name(text: str) -> str:
    """``text`` as a Kubernetes object name (lower case, ``-`` for anything else)."""
    name = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return name[:63].rstrip("-") or "x"


def secret_name(principal: str) -> str:
    """The Secret holding ``principal``'s credentials (what the base's Deployments name)."""
    return f"mesh-credentials-{k8s_name(principal)}"


def render(
    spec: MeshSpec,
    policy: Policy,
    store: CredentialStore,
    settings: Settings,
    out: Path,
    *,
    base: Path,
    services: Services = Services(),
    image: str | None = None,
) -> list[Path]:
    """Write the overlay of ``spec`` on ``base`` to ``out``; the files written.

    ``store`` holds the principals' credentials (``mesh provision`` made them); ``settings``
    gives the namespace, vhost and the mesh's objects, as for ``mesh provision``.  Raises
    ``SpecError`` for an agent id the policy gives no principal, ``ProvisionError`` for a
    principal without credentials.
    """
    processes = plan(spec, policy)
    mesh_plan = build_plan(
        policy, settings.namespace, vhost_of(settings), objects=mesh_objects(settings)
    )
    out.mkdir(parents=True, exist_ok=True)
    files = _Files(out)
    cluster = _cluster_secrets(store.directory / CLUSTER_DIR)
    vhost = mesh_plan.vhost

    principals = sorted(
        {p.principal for p in processes} | {u.principal.name for u in mesh_plan.users}
    )
    generators: list[dict[str, Any]] = []
    for principal in principals:
        kept = store.read(principal)
        if kept is None:
            raise ProvisionError(
                f"no credentials for principal {principal!r} in {store.directory}: run mesh "
                "provision (or mesh provision --no-broker) first"
            )
        password, namespace = kept
        user = f"{namespace}.{principal}"
        env = (
            f"MESH_AMQP_URL={services.amqp_url(user, password, vhost)}\n"
            f"MESH_REDIS_URL={services.redis_url(user, password)}\n"
            f"MESH_NAMESPACE={namespace}\n"
        )
        files.private(f"credentials/{principal}.env", env)
        generators.append(
            {"name": secret_name(principal), "envs": [f"credentials/{principal}.env"]}
        )
    admin_password = cluster["admin"]
    files.private(
        "admin.env",
        f"MESH_AMQP_URL={services.amqp_url(ADMIN, admin_password, vhost)}\n"
        f"MESH_REDIS_URL={services.redis_url(ADMIN, admin_password)}\n"
        f"MESH_MANAGEMENT_URL=http://{_auth(ADMIN, admin_password)}@{services.rabbitmq}:15672/\n"
        f"MESH_NAMESPACE={settings.namespace}\n",
    )
    defined = definitions(mesh_plan, store)
    defined["users"].append(
        {
            "name": ADMIN,
            "password_hash": password_hash(admin_password, stable_salt(ADMIN, admin_password)),
            "hashing_algorithm": SHA256,
            "tags": ["administrator"],
        }
    )
    defined["permissions"].append(
        {"user": ADMIN, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
    )
    files.private("definitions.json", dumps(defined))
    files.private("users.acl", redis_acl(mesh_plan, store, admin_password))
    files.private("erlang.cookie", cluster["cookie"])
    shutil.copyfile(audit_key(store.directory), out / "audit.key")
    (out / "audit.key").chmod(0o600)
    files.written.append(out / "audit.key")
    shutil.copyfile(spec.policy, out / "policy.yaml")
    files.written.append(out / "policy.yaml")

    agents = [
        _agent_deployment(agent, _first(processes, agent.id), image, tls=services.tls)
        for agent in spec.agents
    ]
    files.yaml("agents.yaml", agents)
    files.yaml("provision-job.yaml", [_provision_job(image, tls=services.tls)])
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        # The base's: its objects find the Secrets generated here only in their namespace.
        "namespace": NAMESPACE,
        "resources": [
            os.path.relpath(base.resolve(), out.resolve()),
            "agents.yaml",
            "provision-job.yaml",
        ],
        "secretGenerator": [
            *generators,
            {"name": "mesh-admin", "envs": ["admin.env"]},
            {"name": "mesh-credentials-all", "files": [f"credentials/{p}.env" for p in principals]},
            {"name": "rabbitmq-definitions", "files": ["definitions.json"]},
            {"name": "rabbitmq-erlang-cookie", "files": ["cookie=erlang.cookie"]},
            {"name": "redis-acl", "files": ["users.acl"]},
            {"name": "mesh-audit-key", "files": ["audit.key"]},
        ],
        "configMapGenerator": [{"name": "mesh-policy", "files": ["policy.yaml"]}],
        "patches": _patches(spec, processes),
    }
    # The base's gateway and bridge name their Secrets by role.
    for role in ("gateway", "bridge"):
        of_role = next((p.principal for p in processes if p.role == role), None)
        if of_role is not None and secret_name(of_role) != secret_name(role):
            kustomization["secretGenerator"].append(
                {"name": secret_name(role), "envs": [f"credentials/{of_role}.env"]}
            )
    if image is not None:
        name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        kustomization["images"] = [
            {
                "name": IMAGE.split(":", maxsplit=1)[0],
                "newName": name or image,
                **({"newTag": tag} if tag else {}),
            }
        ]
    files.yaml("kustomization.yaml", [kustomization])
    files.private(".gitignore", "".join(f"{name}\n" for name in SECRET_FILES))
    return files.written


def redis_acl(mesh_plan: Any, store: CredentialStore, admin_password: str) -> str:
    """The Redis ACL file: the default user off, the administrator, and each user of the
    plan with its rules (``RedisUser.setuser``: its password as a SHA-256 only)."""
    lines = ["user default off", f"user {ADMIN} on #{_sha256(admin_password)} ~* &* +@all"]
    for user in mesh_plan.users:
        kept = store.read(user.principal.name)
        if kept is None:
            raise ProvisionError(f"no credentials for principal {user.principal.name!r}")
        lines.append("user " + " ".join(user.redis.setuser(kept[0])))
    return "\n".join(lines) + "\n"


def _agent_deployment(
    agent: AgentSpec, process: Process, image: str | None, *, tls: bool
) -> dict[str, Any]:
    name = f"mesh-agent-{k8s_name(agent.id)}"
    env = {
        **process.env,
        "MESH_POLICY": POLICY_PATH,
        "MESH_HEALTH_PORT": str(HEALTH_PORT),
    }
    mounts: list[dict[str, Any]] = [
        {"name": "policy", "mountPath": "/etc/mesh/policy", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "policy", "configMap": {"name": "mesh-policy"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if tls:
        _add_tls(env, mounts, volumes)
    labels = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": "mesh",
        "mesh.agentmesh.io/role": "agent",
        "mesh.agentmesh.io/agent": k8s_name(agent.id),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/component": "mesh"}},
        "spec": {
            "replicas": agent.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(HEALTH_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    # The drain (shutdown_timeout), leaving the registry, and a margin.
                    "terminationGracePeriodSeconds": math.ceil(process.stop_timeout) + 5,
                    "securityContext": _pod_security(),
                    "containers": [
                        {
                            "name": "agent",
                            "image": image or IMAGE,
                            "args": list(process.args),
                            "envFrom": [{"secretRef": {"name": secret_name(process.principal)}}],
                            "env": [{"name": k, "value": v} for k, v in env.items()],
                            "ports": [{"name": "health", "containerPort": HEALTH_PORT}],
                            "resources": _resources(agent.resources),
                            "livenessProbe": {
                                "httpGet": {"path": "/healthz", "port": "health"},
                                "periodSeconds": 10,
                                "failureThreshold": 3,
                            },
                            "readinessProbe": {
                                "httpGet": {"path": "/readyz", "port": "health"},
                                "periodSeconds": 5,
                                "failureThreshold": 2,
                            },
                            "securityContext": _container_security(),
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def _add_tls(
    env: dict[str, str], mounts: list[dict[str, Any]], volumes: list[dict[str, Any]]
) -> None:
    """What the prod overlay gives the base's pods: the client certificate and the CA."""
    env.update(
        MESH_TLS_CA_FILE=f"{TLS_PATH}/ca.crt",
        MESH_TLS_CERT_FILE=f"{TLS_PATH}/tls.crt",
        MESH_TLS_KEY_FILE=f"{TLS_PATH}/tls.key",
    )
    mounts.append({"name": "tls", "mountPath": TLS_PATH, "readOnly": True})
    volumes.append({"name": "tls", "secret": {"secretName": CLIENT_TLS_SECRET}})


def _provision_job(image: str | None, *, tls: bool) -> dict[str, Any]:
    """``mesh provision`` as the administrator, with the kept credentials copied where it may
    write: it makes the users an agent added to the spec needs, on the running broker."""
    env: dict[str, str] = {}
    mounts: list[dict[str, Any]] = [
        {"name": "policy", "mountPath": "/etc/mesh/policy", "readOnly": True},
        {"name": "credentials", "mountPath": "/etc/mesh/credentials", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "policy", "configMap": {"name": "mesh-policy"}},
        {"name": "credentials", "secret": {"secretName": "mesh-credentials-all"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if tls:
        _add_tls(env, mounts, volumes)
    script = (
        "mkdir -p /tmp/credentials && cp /etc/mesh/credentials/*.env /tmp/credentials/ && "
        f"exec mesh provision {POLICY_PATH} --credentials /tmp/credentials"
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "mesh-provision"},
        "spec": {
            "backoffLimit": 4,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "mesh-provision"}},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "containers": [
                        {
                            "name": "provision",
                            "image": image or IMAGE,
                            "command": ["sh", "-c", script],
                            "envFrom": [{"secretRef": {"name": "mesh-admin"}}],
                            "env": [{"name": k, "value": v} for k, v in env.items()],
                            "resources": DEFAULT_RESOURCES,
                            "securityContext": _container_security(),
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def _patches(spec: MeshSpec, processes: list[Process]) -> list[dict[str, Any]]:
    gateway = spec.gateway.replicas
    patches: list[dict[str, Any]] = [
        {"patch": _delete("apps/v1", "Deployment", EXAMPLE_AGENT)},
        {
            "target": {"kind": "Deployment", "name": "gateway"},
            "patch": yaml.safe_dump(
                [
                    {"op": "replace", "path": "/spec/replicas", "value": max(gateway, 1)},
                    {
                        "op": "replace",
                        "path": "/spec/template/spec/containers/0/args",
                        "value": list(_first_role(processes, "gateway").args),
                    },
                ]
            ),
        },
        {
            "target": {"kind": "HorizontalPodAutoscaler", "name": "gateway"},
            "patch": yaml.safe_dump(
                [{"op": "replace", "path": "/spec/minReplicas", "value": gateway}]
            ),
        },
    ]
    if not spec.bridge_on:
        for kind, api in (
            ("Deployment", "apps/v1"),
            ("Service", "v1"),
            ("Ingress", "networking.k8s.io/v1"),
        ):
            patches.append({"patch": _delete(api, kind, "bridge")})
    return patches


def _delete(api: str, kind: str, name: str) -> str:
    """A patch removing the base's object ``kind``/``name``."""
    return f"$patch: delete\napiVersion: {api}\nkind: {kind}\nmetadata:\n  name: {name}\n"


def _first(processes: list[Process], agent: str) -> Process:
    return next(p for p in processes if p.agent == agent and p.role == "agent")


def _first_role(processes: list[Process], role: str) -> Process:
    return next(p for p in processes if p.role == role)


def _resources(resources: ResourcesSpec) -> dict[str, dict[str, str]]:
    out = {kind: dict(values) for kind, values in DEFAULT_RESOURCES.items()}
    for kind, given in (("requests", resources.requests), ("limits", resources.limits)):
        if given.cpu:
            out[kind]["cpu"] = given.cpu
        if given.memory:
            out[kind]["memory"] = given.memory
    return out


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _cluster_secrets(directory: Path) -> dict[str, str]:
    """The administrator's password and the Erlang cookie, made once (0600) and kept."""
    values = {}
    for name, make in (("admin", secrets.token_urlsafe), ("cookie", secrets.token_hex)):
        path = directory / name
        if not path.exists():
            write_private(path, make(32) + "\n")
        values[name] = path.read_text(encoding="utf-8").strip()
    return values


def _auth(user: str, password: str) -> str:
    return f"{quote(user, safe='')}:{quote(password, safe='')}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Files:
    """What ``render`` writes: secrets readable by their owner only."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.written: list[Path] = []

    def private(self, name: str, text: str) -> None:
        path = self.out / name
        write_private(path, text)
        self.written.append(path)

    def yaml(self, name: str, documents: list[dict[str, Any]]) -> None:
        path = self.out / name
        path.write_text(
            "# Written by mesh k8s render: rerun it rather than editing.\n"
            + yaml.safe_dump_all(documents, sort_keys=False),
            encoding="utf-8",
        )
        self.written.append(path)
