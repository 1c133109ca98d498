"""Ready-made behaviour kinds."""

from behaviours.fsm import FSMBehaviour, FSMError, fsm_state
from behaviours.kinds import (
    CyclicBehaviour,
    OneShotBehaviour,
    PeriodicBehaviour,
    SubscriberBehaviour,
    TimeoutBehaviour,
)

__all__ = [
    "CyclicBehaviour",
    "FSMBehaviour",
    "FSMError",
    "OneShotBehaviour",
    "PeriodicBehaviour",
    "SubscriberBehaviour",
    "TimeoutBehaviour",
    "fsm_state",
]
