"""The base of the mappings in the files the mesh reads (the policy, its sections such as
``mesh.dlp``'s rules): unknown keys refused by name, lists that may be written as one item,
names checked as the mesh checks them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from mesh.topology import TopicError, check_name


class BadKey(ValueError):
    """What a mapping holds under ``key`` is wrong; ``key`` locates it in the file."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class UnknownKey(BadKey):
    """A mapping holds a key its model does not know."""

    def __init__(self, key: str, expected: list[str]) -> None:
        super().__init__(key, f"unknown key {key!r} (expected {', '.join(expected)})")


def one_of(kind: str, value: object, choices: tuple[str, ...]) -> object:
    # Before pydantic's own check, whose message would not name the value.
    if value is not None and value not in choices:
        raise ValueError(f"unknown {kind} {value!r} (expected {', '.join(choices)})")
    return value


def check_spec_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"name {value!r} must be text")
    try:
        return check_name("name", value)
    except TopicError as exc:
        raise ValueError(str(exc)) from None


def listed(value: object) -> object:
    # One item may be written without brackets: ``who: operators``.
    return [value] if isinstance(value, str) else value


Names = Annotated[list[str], BeforeValidator(listed)]
Name = Annotated[str, BeforeValidator(check_spec_name)]


class Spec(BaseModel):
    """A mapping in the file: unknown keys are errors, naming the keys it takes."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # A key the file spells otherwise than Python may (``class``) is the field's alias.
            keys = [field.alias or name for name, field in cls.model_fields.items()]
            for key in data:
                if key not in keys:
                    raise UnknownKey(str(key), keys)
        return data
