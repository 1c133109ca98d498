"""FSMBehaviour: a finite-state machine whose states are coroutines returning the next state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from mesh.behaviour import Behaviour

StateHandler = Callable[[], Awaitable[str | None]]

_STATE_ATTR = "__mesh_fsm_state__"


def fsm_state(name: str, *, initial: bool = False, final: bool = False) -> Callable[[Any], Any]:
    """Mark a method as the FSM state ``name``; it returns the next state's name."""

    def decorate(func: Any) -> Any:
        setattr(func, _STATE_ATTR, (name, initial, final))
        return func

    return decorate


class FSMError(RuntimeError):
    """The machine took a transition it does not declare, or reached an unknown state."""


class FSMBehaviour(Behaviour):
    """Runs states one after another until a final state has run.

    Declare states with ``@fsm_state("name", initial=True)`` / ``final=True``; a state
    returns the next state's name.  ``transitions`` (``{"a": {"b", "c"}}``) is optional:
    when given, any other transition fails the behaviour with ``FSMError``.  The final
    state's return value, if an int, is the exit code.
    """

    kind = "fsm"
    transitions: ClassVar[Mapping[str, set[str]] | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.states: dict[str, StateHandler] = {}
        self.initial: str | None = None
        self.finals: set[str] = set()
        for attr in dir(type(self)):
            marker = getattr(getattr(type(self), attr, None), _STATE_ATTR, None)
            if marker is None:
                continue
            name, initial, final = marker
            self.states[name] = getattr(self, attr)
            if initial:
                if self.initial is not None:
                    raise FSMError(f"{type(self).__name__}: two initial states")
                self.initial = name
            if final:
                self.finals.add(name)
        if self.initial is None or not self.finals:
            raise FSMError(f"{type(self).__name__} needs one initial and at least one final state")
        self.current: str | None = None
        self.history: list[str] = []

    async def main(self) -> int | None:
        name: str | None = self.initial
        self.history = []
        while True:
            assert name is not None
            if name not in self.states:
                raise FSMError(f"{type(self).__name__}: unknown state {name!r}")
            self.current = name
            self.history.append(name)
            result = await self.states[name]()
            if name in self.finals:
                return result if isinstance(result, int) else 0
            if result is None:
                raise FSMError(f"state {name!r} is not final and returned no next state")
            allowed = self.transitions.get(name, set()) if self.transitions is not None else None
            if allowed is not None and result not in allowed:
                raise FSMError(f"transition {name!r} -> {result!r} is not declared")
            name = result
