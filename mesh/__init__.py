"""agentmesh: agents hosting concurrent behaviours on RabbitMQ, governed by a gateway."""

from mesh.agent import Agent, AgentStopped, PingReply, RemoteError, RequestTimeout
from mesh.behaviour import Behaviour, BehaviourStatus, on, rpc
from mesh.config import ConfigError, Settings
from mesh.envelope import EnvelopeError, Message, MessageType
from mesh.topology import TopicError
from mesh.transport import PublishError

__all__ = [
    "Agent",
    "AgentStopped",
    "Behaviour",
    "BehaviourStatus",
    "ConfigError",
    "EnvelopeError",
    "Message",
    "MessageType",
    "PingReply",
    "PublishError",
    "RemoteError",
    "RequestTimeout",
    "Settings",
    "TopicError",
    "on",
    "rpc",
]
