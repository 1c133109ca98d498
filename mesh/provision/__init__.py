"""Provisioning the broker from the policy: ``mesh provision policy.yaml``.

``build_plan`` turns a policy into the broker users it wants, one per principal that
connects (``plan``); ``CredentialStore`` keeps their generated passwords
(``credentials``); ``diff`` compares both with the broker (``read_state``) into changes;
``provision`` makes them (``apply``), and declares the mesh's exchanges and queues
(``objects``) where missing; ``definitions`` is all of it as a RabbitMQ definitions file for
a broker to import at boot.
"""

from mesh.provision.apply import provision
from mesh.provision.credentials import Credentials, CredentialStore, credentials_dir
from mesh.provision.definitions import definitions, dumps
from mesh.provision.diff import BrokerState, Change, diff, read_state
from mesh.provision.errors import ProvisionError
from mesh.provision.objects import MeshObjects, mesh_objects
from mesh.provision.plan import (
    MANAGED_TAG,
    DesiredUser,
    Plan,
    build_plan,
    managed_by,
    managed_tags,
)

__all__ = [
    "MANAGED_TAG",
    "BrokerState",
    "Change",
    "CredentialStore",
    "Credentials",
    "DesiredUser",
    "MeshObjects",
    "Plan",
    "ProvisionError",
    "build_plan",
    "credentials_dir",
    "definitions",
    "diff",
    "dumps",
    "managed_by",
    "managed_tags",
    "mesh_objects",
    "provision",
    "read_state",
]
