"""agentmesh: agents hosting concurrent behaviours on RabbitMQ, governed by a gateway."""

from mesh.agent import Agent, AgentStopped, RemoteError, RequestTimeout
from mesh.behaviour import Behaviour, BehaviourStatus, on, on_registry, rpc
from mesh.client import Client
from mesh.config import ConfigError, Settings
from mesh.connection import BrokerUnavailable
from mesh.envelope import EnvelopeError, Message, MessageType
from mesh.registry import AgentRecord, BehaviourRecord, InstanceRecord
from mesh.state import InvalidState, StateConflict, StateError, StateUnavailable
from mesh.topology import TopicError, TopologyError
from mesh.transport import PublishError

__all__ = [
    "Agent",
    "AgentRecord",
    "AgentStopped",
    "Behaviour",
    "BehaviourRecord",
    "BehaviourStatus",
    "BrokerUnavailable",
    "Client",
    "ConfigError",
    "EnvelopeError",
    "InstanceRecord",
    "InvalidState",
    "Message",
    "MessageType",
    "PublishError",
    "RemoteError",
    "RequestTimeout",
    "Settings",
    "StateConflict",
    "StateError",
    "StateUnavailable",
    "TopicError",
    "TopologyError",
    "on",
    "on_registry",
    "rpc",
]
