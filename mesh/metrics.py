"""Metrics: one agent process's Prometheus metrics, served on ``/metrics`` (``mesh.health``).

Each ``Metrics`` has a registry of its own, not prometheus-client's global one: an agent owns
its ``Metrics``, so several agents in one process (tests, ``mesh demo``) count apart.  The
children a message touches are bound once (per behaviour, per outcome), so counting costs a
message a dictionary lookup, an increment and an observation.
"""

from __future__ import annotations

from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

Outcome = Literal["handled", "skipped", "deferred", "failed", "dead_lettered"]
"""What became of one delivery to a behaviour (``mesh_messages_total{outcome}``): its handler
ran (``handled``); an idempotent behaviour had handled it before (``skipped``) or is
handling another delivery of it (``deferred``); the handler raised and the message is
retried, or the requester answered with the error (``failed``); it went to the dead letters,
refused or out of attempts (``dead_lettered``)."""

OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
"""Seconds; handlers run from well under a millisecond to seconds."""

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The content type of ``Metrics.exposition``."""


class BehaviourMetrics:
    """One behaviour's series, bound once."""

    __slots__ = ("_outcomes", "_seconds")

    def __init__(self, messages: Counter, seconds: Histogram, behaviour: str) -> None:
        self._outcomes = {outcome: messages.labels(behaviour, outcome) for outcome in OUTCOMES}
        self._seconds = seconds.labels(behaviour)

    def settled(self, outcome: Outcome, seconds: float | None = None) -> None:
        """Count a delivery settled with ``outcome``, after ``seconds`` of handling."""
        self._outcomes[outcome].inc()
        if seconds is not None:
            self._seconds.observe(seconds)


class Metrics:
    """The counters and histograms of one agent instance, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._messages = Counter(
            "mesh_messages",
            "Deliveries to a behaviour's handlers, by what became of them.",
            ["behaviour", "outcome"],
            registry=self.registry,
        )
        self._handler_seconds = Histogram(
            "mesh_handler_seconds",
            "Seconds from a delivery's decoding to its settling (the handler and the ack).",
            ["behaviour"],
            buckets=HANDLER_BUCKETS,
            registry=self.registry,
        )
        confirms = Counter(
            "mesh_publish_confirms",
            "Publishes the broker confirmed (ok), or did not: refused, unroutable, or no "
            "confirm within the publish timeout (failed).",
            ["result"],
            registry=self.registry,
        )
        self._confirmed = confirms.labels("ok")
        self._unconfirmed = confirms.labels("failed")
        self._reconnects = Counter(
            "mesh_reconnects",
            "Times a connection to RabbitMQ came back after it was lost.",
            ["connection"],
            registry=self.registry,
        )
        self._decision_family: Counter | None = None
        self._decisions: dict[tuple[str, str], Counter] = {}

    def behaviour(self, name: str) -> BehaviourMetrics:
        """The series of behaviour ``name`` (every outcome shows, at 0 until it happens)."""
        return BehaviourMetrics(self._messages, self._handler_seconds, name)

    def published(self, confirmed: bool) -> None:
        (self._confirmed if confirmed else self._unconfirmed).inc()

    def reconnected(self, connection: str) -> None:
        self._reconnects.labels(connection).inc()

    def decided(self, stage: str, outcome: str) -> None:
        """Count a gateway decision: ``outcome`` (``passed``, ``denied``) at ``stage``.

        Registered at a gateway's first decision, so that other agents show no such series.
        """
        child = self._decisions.get((stage, outcome))
        if child is None:
            if self._decision_family is None:
                self._decision_family = Counter(
                    "mesh_gateway_decisions",
                    "The gateway's decisions on messages, by the stage that made them "
                    "(pipeline: every stage passed it) and the outcome.",
                    ["stage", "outcome"],
                    registry=self.registry,
                )
            child = self._decisions[stage, outcome] = self._decision_family.labels(stage, outcome)
        child.inc()

    def exposition(self) -> bytes:
        """Every series in Prometheus's text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
