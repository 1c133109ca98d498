"""YAML files the mesh reads (the policy, a mesh spec): plain data with the line of every
value, and pydantic's errors about that data said the way the files' readers name them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import yaml
from pydantic_core import ErrorDetails

from mesh.filespec import BadKey

Location = tuple[str | int, ...]
"""Where a value sits in a document: keys and list indexes from the top."""

YamlProblem = tuple[Location, str, int | None]
"""Where (path, line) and why."""

MAX_DEPTH = 32
"""Far deeper than any file the mesh reads goes."""

TYPES = {
    "string_type": "text",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "bool_type": "true or false",
    "int_type": "a whole number",
    "float_type": "a number",
}
"""pydantic's type errors, as what the file should have held instead."""


class YamlError(ValueError):
    """The text is no YAML the mesh reads: ``problems`` say where and why."""

    def __init__(self, problems: list[YamlProblem]) -> None:
        super().__init__("; ".join(message for _, message, _ in problems))
        self.problems = problems


def read_yaml(text: str) -> tuple[Any, dict[Location, int]]:
    """The data in ``text`` (``None`` when empty) and the line of each value's path.

    Raises ``YamlError`` for text that is not YAML, repeated keys and keys that are not text
    (plain YAML keeps the last of two equal keys, silently).
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = exc.problem or exc.context or "not valid YAML"
        raise YamlError([((), f"not valid YAML: {reason}", line)]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character
        shown = f"U+{char:04X}" if isinstance(char, int) else repr(char)
        reason = f"character {shown} is not allowed ({exc.reason})"
        raise YamlError([((), f"not valid YAML: {reason}", line)]) from None
    if node is None:
        return None, {}
    reader = _Reader()
    data = reader.read(node, ())
    if reader.problems:
        raise YamlError(reader.problems)
    return data, reader.lines


def line_of(path: Location, lines: Mapping[Location, int]) -> int | None:
    """The line of ``path``, else of its longest prefix the file has a line for."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def explain(error: ErrorDetails, field: Callable[[Location], str]) -> tuple[Location, str]:
    """Where a pydantic validation error points and what it means; ``field(path)`` is the
    part of the path the message names itself (empty: none)."""
    path: Location = tuple(part for part in error["loc"] if part != "[key]")
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, BadKey):
        return (*path, cause.key), str(cause)
    if error["type"] == "value_error" and cause is not None:
        return path, str(cause)
    if error["type"] == "missing":
        return path[:-1], f"missing key {path[-1]!r}"
    prefix = f"{field(path)}: " if field(path) else ""
    if error["type"] in TYPES:
        return path, f"{prefix}expected {TYPES[error['type']]}, got {error['input']!r}"
    return path, prefix + error["msg"]


class _Reader:
    """Turns composed YAML nodes into plain data, noting each value's line and refusing
    repeated and non-text keys."""

    def __init__(self) -> None:
        self.lines: dict[Location, int] = {}
        self.problems: list[YamlProblem] = []
        self._scalars = yaml.SafeLoader("")

    def read(self, node: yaml.Node, path: Location) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if len(path) > MAX_DEPTH:  # an alias inside itself (&a [*a]) never ends
            line = node.start_mark.line + 1
            self.problems.append((path, "nested too deep (an alias inside itself?)", line))
            return None
        if isinstance(node, yaml.MappingNode):
            self._scalars.flatten_mapping(node)  # '<<' merge keys
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalars.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    self.problems.append(
                        (path, f"key {key!r} must be text: quote it ('{key}')", line)
                    )
                elif key in out:
                    first = self.lines[(*path, key)]
                    # Under the policy's principals, roles and rule_sets the key is what the
                    # problem is about already ("principal 'v7': declared twice").
                    what = "declared" if len(path) == 1 else f"{key!r} appears"
                    self.problems.append(
                        ((*path, key), f"{what} twice (first at line {first})", line)
                    )
                else:
                    # A value's line is its key's: "telemetry:" rather than its first rule.
                    self.lines[(*path, key)] = line
                    out[key] = self.read(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.read(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalars.construct_object(node)
