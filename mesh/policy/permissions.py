"""Broker permissions: what a user may do, compiled into the checks RabbitMQ makes itself.

The gateway decides what each message may do; the broker decides what each connection may
touch at all, so a process that skips the gateway (its own code, or someone holding its
credentials) gets no further than its policy.  RabbitMQ 3.10 checks, per user (tried on the
broker in ``tests/test_permissions.py``):

- on the vhost, three regexes over names, one set of names for exchanges and queues alike:
  ``configure`` to declare or delete; ``write`` to publish to an exchange, to bind a queue
  (the destination) and to name an exchange as a queue's dead-letter or an exchange's
  alternate exchange; ``read`` to consume, get or purge a queue, to bind to an exchange (the
  source), and on a queue declared with a dead-letter exchange or an exchange declared with
  an alternate one.  Passive declares need nothing;
- per topic exchange, two regexes over keys: ``write`` over the routing keys published to
  it, ``read`` over the binding keys bound to it (a queue or an exchange, bind and unbind).
  An exchange with no topic permissions for the user admits every key, so each topic
  exchange a user can reach here gets them.

RabbitMQ searches a regex anywhere in the name or key (Erlang's ``re``, unanchored), so each
one here is anchored.  They keep to syntax PCRE and Python's ``re`` read alike, and topic
permissions hold no ``{`` (RabbitMQ expands ``{username}`` and ``{vhost}`` there).  ``$``
also matches before a final newline, so an admitted name or key may end in one more: no name
the mesh declares and no topic the gateway relays does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from mesh import topology
from mesh.policy import globs
from mesh.policy.topics import SELF, check_rule_pattern

NOTHING = "^(?!)$"
"""Admits no name or key.  Not ``""``: RabbitMQ reads that as ``^$``, the empty key."""
ANY = ".*"

_ID_CHAR = "[A-Za-z0-9_-]"
_WORD = f"{_ID_CHAR}+"
"""A word of a topic, binding key or name (``topology.check_binding``)."""
_USER_TOPIC = rf"[A-Za-z0-9-][A-Za-z0-9_-]*(?:\.{_WORD})*"
"""A topic a user may publish (``topology.check_topic``): no ``_`` first."""
_MESH_KEY = rf"_(?:req|reply|err|ctl)\.{_WORD}\.{_WORD}|_registry\.{_WORD}"
"""The mesh's own routing keys (``topology.request_key`` and the others)."""
_AGENT_SENDS = rf"_(?:req|reply|ctl)\.{_WORD}\.{_WORD}|_registry\.{_WORD}"
"""What an agent sends on the internal lane: requests, replies (an error reply too, as
``_reply``), control commands, registry events; ``_err`` notices are the gateway's."""
_CLIENT = rf"client-{_WORD}"
"""The id of a ``mesh`` command's ``Client`` (``client-<random>``)."""
_TAIL_QUEUE = "amq_[0-9a-f]+"
"""``mesh tail``'s exclusive queue, named by aio-pika."""
DEFAULT_EXCHANGE = "amq.default"
"""The default exchange, as RabbitMQ names it when it checks a publish to it."""

_MAYBE_SEP = r"(?:^|\.)"
"""Before a word that may be a key's first or come after a dot (after a ``#`` that may
match no word); ``covering_regex`` keeps a key from starting with a dot."""
_NOT_HASH = rf"(?:{_WORD}|\*)"
_ANY_WORD = rf"(?:{_WORD}|\*|#)"


@dataclass(frozen=True)
class TopicPermission:
    """What a user may publish (``write``: routing keys) and bind (``read``: binding keys)
    on one topic exchange."""

    exchange: str
    write: str = NOTHING
    read: str = NOTHING


@dataclass(frozen=True)
class UserPermissions:
    """A broker user's permissions on the mesh's vhost, as RabbitMQ takes them."""

    configure: str
    write: str
    read: str
    topics: tuple[TopicPermission, ...]
    tags: tuple[str, ...] = ()
    """User tags: ``management`` lets a user list its vhost's queues over the HTTP API."""


def covering_regex(patterns: Sequence[str]) -> str:
    """An anchored regex admitting exactly the binding keys some pattern of ``patterns`` covers.

    A pattern covers a binding key when every topic the key matches, the pattern matches too:
    ``vehicle.#`` covers ``vehicle.*.speed`` and ``vehicle.#`` itself, ``vehicle.*.speed``
    covers neither ``vehicle.#`` nor ``#``.  Only keys of mesh words, ``*`` and ``#`` are
    admitted; ``NOTHING`` when there are no patterns.
    """
    return _covering_regex({topology.check_binding(p) for p in patterns}, re.escape)


def _covering_regex(patterns: Collection[str], literal: Callable[[str], str]) -> str:
    """``covering_regex`` of checked ``patterns``, whose literal words ``literal`` turns
    into regexes (``{self}`` into the ids it stands for)."""
    if not patterns:
        return NOTHING
    body = "|".join(_covering(p, literal) for p in sorted(patterns))
    # A leading dot (an empty first word) must not pass for the start _MAYBE_SEP allows.
    return f"^(?!\\.)(?:{body})$" if _MAYBE_SEP in body else f"^(?:{body})$"


def _covering(pattern: str, literal: Callable[[str], str]) -> str:
    # Wildcards next to each other match the same topics in any order (`#.*` and `*.#`: one
    # word or more), so a run of them is judged by its count of `*` and whether it holds a `#`.
    # Without `#` it covers that many key words, none `#` (a `#` can be longer or shorter);
    # with one, any key words among which at least that many are not `#`.  Repeated, not
    # `{n}`: see the module docstring.
    parts: list[str] = []
    sep = ""  # before the next key word: nothing at the start, a dot once one surely matched
    stars, hashed = 0, False
    for word in [*pattern.split("."), None]:  # None: the end, after the last run
        if word == "*":
            stars += 1
            continue
        if word == "#":
            hashed = True
            continue
        if hashed:
            run = sep or _MAYBE_SEP
            parts.append(f"(?:(?:{run}#)*{run}{_NOT_HASH})" * stars)
            parts.append(f"(?:{run}{_ANY_WORD})*")
            sep = r"\." if stars or sep == r"\." else _MAYBE_SEP
        else:
            for _ in range(stars):
                parts.append(sep + _NOT_HASH)
                sep = r"\."
        if word is not None:
            parts.append(sep + literal(word))
            sep = r"\."
        stars, hashed = 0, False
    return "".join(parts)


def _names(*alternatives: str) -> str:
    """A regex admitting exactly the names (or keys) one of the regex ``alternatives`` does."""
    return f"^(?:{'|'.join(alternatives)})$"


def _exact(*names: str) -> list[str]:
    return [re.escape(name) for name in names]


def _own_queues(agent: str) -> str:
    """The queues of the agent whose id ``agent`` (a regex) matches: its behaviours' and
    ``@rpc`` queue (``mesh.q.``), its instances' inboxes and broadcast queues (``mesh.i.``).
    Agent ids have no dots, so the prefix is the agent's alone."""
    return rf"mesh\.[qi]\.{agent}\..+"


def agent_permissions(
    agent_id: str, subscriptions: Sequence[str], *, registry_events: bool = True
) -> UserPermissions:
    """The permissions of agent ``agent_id``'s user, whose ``subscribe`` rules allow the binding
    patterns ``subscriptions`` on ``mesh.topic``.

    It publishes only to the policy exchanges, ``mesh.dlx`` (its dead letters carry its
    verified ``user_id``); it declares, binds and reads only its own queues and exchanges
    (its retry path among them, ``topology.declare_retry_path``); on ``mesh.internal`` it
    binds only what is addressed to it: requests for its operations, replies and error
    notices for its instances, control for it and ``_all``, and registry events if
    ``registry_events``.  The shared exchanges and the gateway's queues are not its to
    declare (passively, at most).
    """
    topology.check_name("agent id", agent_id)
    patterns = [topology.check_pattern(p) for p in subscriptions]  # no {self} here
    return shared_agent_permissions([agent_id], patterns, registry_events=registry_events)


def shared_agent_permissions(
    agents: Sequence[str],
    subscriptions: Sequence[str],
    *,
    excluding: Collection[str] = (),
    registry_events: bool = True,
    read_dead: bool = False,
) -> UserPermissions:
    """``agent_permissions`` of one user shared by every agent whose id ``agents`` lists or
    matches (ids and globs, as a policy principal names them), but the ids in ``excluding``
    (listed by other principals, whose own users hold those).

    ``{self}`` in ``subscriptions`` (a word of a pattern) stands for any of those ids: the
    broker cannot tell apart agents sharing a user, so with ``vehicle.{self}.#`` each may
    bind ``vehicle.<any of them>.#``.  The gateway still decides per agent id.

    ``read_dead``: it may also read the ``mesh.dead`` stream (the bridge lists dead letters
    to the callers the policy lets redrive them; it writes to no queue of theirs).
    """
    if not agents:
        raise topology.TopicError("no agent ids or globs: a user of no agent may do nothing")
    agent = _agents_regex(agents, excluding)
    own = _own_queues(agent)
    addressed = [
        topology.request_key(SELF, "*"),
        topology.reply_key(SELF, "*"),
        topology.error_key(SELF, "*"),
        topology.control_key(SELF, "*"),
        topology.control_key(topology.ALL_AGENTS, "*"),
    ]
    if registry_events:
        addressed.append(topology.registry_key("*"))

    def literal(word: str) -> str:
        return agent if word == SELF else re.escape(word)

    subscribed = {_check_subscription(p) for p in subscriptions}
    return UserPermissions(
        configure=_names(own),
        write=_names(
            *_exact(
                topology.POLICY_EXCHANGE,
                topology.INTERNAL_POLICY_EXCHANGE,
                topology.DEAD_LETTER_EXCHANGE,
            ),
            own,
        ),
        read=_names(
            *_exact(
                topology.TOPIC_EXCHANGE,
                topology.INTERNAL_EXCHANGE,
                *([topology.DEAD_LETTER_QUEUE] if read_dead else []),
            ),
            own,
        ),
        topics=(
            TopicPermission(topology.POLICY_EXCHANGE, write=_names(_USER_TOPIC)),
            TopicPermission(topology.INTERNAL_POLICY_EXCHANGE, write=_names(_AGENT_SENDS)),
            TopicPermission(topology.TOPIC_EXCHANGE, read=_covering_regex(subscribed, literal)),
            TopicPermission(
                topology.INTERNAL_EXCHANGE, read=_covering_regex(set(addressed), literal)
            ),
            TopicPermission(topology.DEAD_LETTER_EXCHANGE, write=ANY),
            # Its retry and requeue exchanges are its own (topology.declare_retry_path):
            # under its prefix, where nobody else may publish or bind.
        ),
    )


def _check_subscription(pattern: str) -> str:
    """``pattern`` if a user may bind it, ``{self}`` standing for a word."""
    try:
        return check_rule_pattern(pattern)
    except ValueError as exc:
        raise topology.TopicError(str(exc)) from None


def _agents_regex(agents: Sequence[str], excluding: Collection[str]) -> str:
    """A regex matching exactly the agent ids ``agents`` lists or matches, but ``excluding``:
    one word, as it stands in a queue name or a routing key (dots around it)."""
    alternatives = sorted({_glob_regex(a) for a in agents})
    regex = alternatives[0] if len(alternatives) == 1 else f"(?:{'|'.join(alternatives)})"
    if excluding:
        ids = "|".join(re.escape(topology.check_name("agent id", a)) for a in sorted(excluding))
        regex = rf"(?!(?:{ids})(?:\.|$)){regex}"
    return regex


_GLOB_TOKEN = re.compile(r"\[[^\]]+\]|.")


def _glob_regex(glob: str) -> str:
    """A regex matching the agent ids ``glob`` matches (an id: itself)."""
    if not globs.is_glob(glob):
        return re.escape(topology.check_name("agent id", glob))
    try:
        globs.check_glob(glob)
    except ValueError as exc:
        raise topology.TopicError(str(exc)) from None
    parts = []
    for token in _GLOB_TOKEN.findall(glob):
        if token == "*":
            parts.append(f"{_ID_CHAR}*")
        elif token == "?":
            parts.append(_ID_CHAR)
        elif token.startswith("["):
            # The id characters the class takes, asked of fnmatch itself, so that ranges
            # and '!' read exactly as the policy reads them.
            parts.append(_char_class([c for c in globs.ID_CHARS if globs.matches(token, c)]))
        else:
            parts.append(re.escape(token))
    regex = "".join(parts)
    # An agent id starts with a letter or digit (so is never empty), where a glob may not.
    return regex if glob[0].isalnum() else f"(?=[A-Za-z0-9]){regex}"


def _char_class(chars: Sequence[str]) -> str:
    """A regex class of ``chars`` (id characters), runs of three or more as ranges."""
    runs: list[list[str]] = []
    for char in sorted(chars):
        if runs and ord(char) == ord(runs[-1][-1]) + 1:
            runs[-1].append(char)
        else:
            runs.append([char])
    if len(runs) == 1 and len(runs[0]) == 1:
        return re.escape(runs[0][0])
    body = "".join(
        f"{re.escape(run[0])}-{re.escape(run[-1])}"
        if len(run) > 2
        else "".join(re.escape(c) for c in run)
        for run in runs
    )
    return f"[{body}]"


def bridge_permissions(
    bridge_id: str, subscriptions: Sequence[str], *, registry_events: bool = True
) -> UserPermissions:
    """The bridge's user: an agent (``agent_permissions``) whose ``subscriptions`` are what
    its principals may subscribe to, which also reads ``mesh.dead`` (``GET /dead``).  It
    publishes on their behalf, and the gateway authorizes each principal, not the bridge."""
    topology.check_name("agent id", bridge_id)
    patterns = [topology.check_pattern(p) for p in subscriptions]
    return shared_agent_permissions(
        [bridge_id], patterns, registry_events=registry_events, read_dead=True
    )


def gateway_permissions(gateway_id: str = "gateway") -> UserPermissions:
    """The gateway's user: it declares the mesh's exchanges, its own queues and the
    dead-letter path, relays from the policy exchanges to ``mesh.topic`` and
    ``mesh.internal``, files dead letters, and reads them back to redrive them into their
    queues through the default exchange (``amq.default``, as RabbitMQ names it for
    permissions): the one user that may write to any queue.  As an agent it binds on
    ``mesh.internal`` only what is addressed to it, its ``redrive`` requests among them
    (no ``_all``: gateways take no broadcast control)."""
    gateway = re.escape(topology.check_name("gateway id", gateway_id))
    own = _own_queues(gateway)
    queues = _exact(
        topology.GATEWAY_QUEUE,
        topology.INTERNAL_GATEWAY_QUEUE,
        topology.DEAD_LETTER_INCOMING,
        topology.DEAD_LETTER_QUEUE,
    )
    addressed = [
        topology.request_key(gateway_id, "*"),
        topology.reply_key(gateway_id, "*"),
        topology.error_key(gateway_id, "*"),
        topology.control_key(gateway_id, "*"),
    ]
    return UserPermissions(
        configure=_names(
            *_exact(
                topology.POLICY_EXCHANGE,
                topology.TOPIC_EXCHANGE,
                topology.INTERNAL_POLICY_EXCHANGE,
                topology.INTERNAL_EXCHANGE,
                topology.DEAD_LETTER_EXCHANGE,
                topology.FILING_EXCHANGE,
            ),
            *queues,
            own,
        ),
        write=_names(
            *_exact(
                topology.TOPIC_EXCHANGE,
                topology.INTERNAL_EXCHANGE,
                topology.INTERNAL_POLICY_EXCHANGE,
                topology.DEAD_LETTER_EXCHANGE,
                topology.FILING_EXCHANGE,
                DEFAULT_EXCHANGE,
            ),
            *queues,
            own,
        ),
        read=_names(
            *_exact(
                topology.POLICY_EXCHANGE,
                topology.INTERNAL_POLICY_EXCHANGE,
                topology.INTERNAL_EXCHANGE,
                topology.DEAD_LETTER_EXCHANGE,
                topology.FILING_EXCHANGE,
                topology.GATEWAY_QUEUE,
                topology.INTERNAL_GATEWAY_QUEUE,
                topology.DEAD_LETTER_INCOMING,
                topology.DEAD_LETTER_QUEUE,
            ),
            own,
        ),
        topics=(
            TopicPermission(topology.POLICY_EXCHANGE, read=ANY),
            # Its own registry events and ping answers.
            TopicPermission(
                topology.INTERNAL_POLICY_EXCHANGE, write=_names(_AGENT_SENDS), read=ANY
            ),
            TopicPermission(topology.TOPIC_EXCHANGE, write=_names(_USER_TOPIC)),
            TopicPermission(
                topology.INTERNAL_EXCHANGE, write=_names(_MESH_KEY), read=covering_regex(addressed)
            ),
            TopicPermission(topology.DEAD_LETTER_EXCHANGE, write=ANY, read=ANY),
        ),
    )


def operator_permissions(*, tail: Sequence[str] = ("#",), forget: bool = False) -> UserPermissions:
    """The user of an operator's ``mesh`` commands.

    Each command runs a ``Client``: an agent ``client-<random>`` with an inbox for replies,
    which publishes events, requests and control commands.  ``mesh tail`` binds a queue of
    its own to ``mesh.topic`` with the patterns ``tail`` covers; ``mesh dead`` reads the
    ``mesh.dead`` stream (a redrive is the gateway's to make: the command asks it with a
    request).  ``mesh queues`` lists queues over the management API, which takes the user
    tag ``management``, not AMQP permissions; ``mesh forget`` deletes queues there, which
    takes ``configure`` on every agent's queues (``forget``).
    """
    own = f"{_own_queues(_CLIENT)}|{_TAIL_QUEUE}"
    configure = [own, _own_queues(_WORD)] if forget else [own]
    return UserPermissions(
        configure=_names(*configure),
        write=_names(*_exact(topology.POLICY_EXCHANGE, topology.INTERNAL_POLICY_EXCHANGE), own),
        read=_names(
            *_exact(
                topology.TOPIC_EXCHANGE, topology.INTERNAL_EXCHANGE, topology.DEAD_LETTER_QUEUE
            ),
            own,
        ),
        topics=(
            TopicPermission(topology.POLICY_EXCHANGE, write=_names(_USER_TOPIC)),
            TopicPermission(
                topology.INTERNAL_POLICY_EXCHANGE,
                write=_names(rf"_(?:req|ctl)\.{_WORD}\.{_WORD}"),
            ),
            TopicPermission(
                topology.TOPIC_EXCHANGE,
                read=covering_regex([topology.check_pattern(p) for p in tail]),
            ),
            # The inbox binds its instance's exact keys (a Client takes no control).
            TopicPermission(
                topology.INTERNAL_EXCHANGE, read=_names(rf"_(?:reply|err)\.{_CLIENT}\.{_WORD}")
            ),
        ),
        tags=("management",),
    )
