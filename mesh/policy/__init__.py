"""The mesh's policy: who may publish, subscribe, request, reply and control what.

One ``policy.yaml`` declares principals, roles and rule sets; ``load_policy`` checks it
(every problem with its file and line) and compiles it into a ``Policy`` that answers
``decide(agent, action, target)`` for the gateway, ``enforced_subscriptions(agent)`` for
broker permissions, and ``mesh policy check|explain`` for people.  Bearer tokens of the
policy's users live hashed beside it (``TokenStore``).
"""

from mesh.policy.decision import Decision, RuleRef
from mesh.policy.errors import PolicyError, Problem
from mesh.policy.loader import load_policy, parse_policy
from mesh.policy.model import ACTIONS, KINDS, MODES, Action, Kind, Mode, PolicyFile
from mesh.policy.policy import BROKER_ACTIONS, Policy, Principal
from mesh.policy.tokens import TokenError, TokenRecord, TokenStore, tokens_path
from mesh.policy.topics import covers
from mesh.policy.users import broker_user

__all__ = [
    "ACTIONS",
    "BROKER_ACTIONS",
    "KINDS",
    "MODES",
    "Action",
    "Decision",
    "Kind",
    "Mode",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "Principal",
    "Problem",
    "RuleRef",
    "TokenError",
    "TokenRecord",
    "TokenStore",
    "broker_user",
    "covers",
    "load_policy",
    "parse_policy",
    "tokens_path",
]
