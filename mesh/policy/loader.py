"""Reading ``policy.yaml``: YAML with the line of every value, so each problem names its line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from mesh.filespec import UnknownKey
from mesh.policy.errors import Location, PolicyError, Problem, field
from mesh.policy.model import PolicyFile
from mesh.policy.policy import Policy

_MAX_DEPTH = 32
"""Far deeper than any policy goes."""
_TOP_KEYS = ", ".join(PolicyFile.model_fields)
_TYPES = {
    "string_type": "text",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "bool_type": "true or false",
}


def load_policy(path: str | Path) -> Policy:
    """Read, check and compile the policy file at ``path``.

    Raises ``PolicyError`` listing every problem as ``file:line: where: reason``, and
    ``OSError`` when the file cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([Problem((), f"not UTF-8 text: {exc.reason}")], str(path)) from None
    return parse_policy(text, str(path), file=path)


def parse_policy(text: str, source: str = "policy.yaml", *, file: Path | None = None) -> Policy:
    """Check and compile a policy given as YAML text; ``source`` names it in errors."""
    data, lines = _read_yaml(text, source)
    try:
        spec = PolicyFile.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(error) for error in exc.errors()]
        raise PolicyError(problems).located(source, lines) from None
    try:
        return Policy(spec, source=file, lines=lines)
    except PolicyError as exc:
        raise exc.located(source, lines) from None


def _read_yaml(text: str, source: str) -> tuple[Any, dict[Location, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = exc.problem or exc.context or "not valid YAML"
        raise PolicyError([Problem((), f"not valid YAML: {reason}", line)], source) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character
        shown = f"U+{char:04X}" if isinstance(char, int) else repr(char)
        reason = f"character {shown} is not allowed ({exc.reason})"
        raise PolicyError([Problem((), f"not valid YAML: {reason}", line)], source) from None
    if node is None:
        raise PolicyError([Problem((), f"empty policy (expected {_TOP_KEYS})", 1)], source)
    reader = _Reader()
    data = reader.read(node, ())
    if reader.problems:
        raise PolicyError(reader.problems, source)
    return data, reader.lines


class _Reader:
    """Turns composed YAML nodes into plain data, noting each value's line and refusing
    repeated and non-text keys (plain YAML keeps the last of two equal keys, silently)."""

    def __init__(self) -> None:
        self.lines: dict[Location, int] = {}
        self.problems: list[Problem] = []
        self._scalars = yaml.SafeLoader("")

    def read(self, node: yaml.Node, path: Location) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if len(path) > _MAX_DEPTH:  # an alias inside itself (&a [*a]) never ends
            line = node.start_mark.line + 1
            self.problems.append(Problem(path, "nested too deep (an alias inside itself?)", line))
            return None
        if isinstance(node, yaml.MappingNode):
            self._scalars.flatten_mapping(node)  # '<<' merge keys
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalars.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    self.problems.append(
                        Problem(path, f"key {key!r} must be text: quote it ('{key}')", line)
                    )
                elif key in out:
                    first = self.lines[(*path, key)]
                    # Under principals, roles and rule_sets the key is what the problem
                    # is about already ("principal 'v7': declared twice").
                    what = "declared" if len(path) == 1 else f"{key!r} appears"
                    self.problems.append(
                        Problem((*path, key), f"{what} twice (first at line {first})", line)
                    )
                else:
                    # A value's line is its key's: "telemetry:" rather than its first rule.
                    self.lines[(*path, key)] = line
                    out[key] = self.read(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.read(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalars.construct_object(node)


def _problem(error: ErrorDetails) -> Problem:
    path: Location = tuple(part for part in error["loc"] if part != "[key]")
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, UnknownKey):
        return Problem((*path, cause.key), str(cause))
    if error["type"] == "value_error" and cause is not None:
        return Problem(path, str(cause))
    if error["type"] == "missing":
        return Problem(path[:-1], f"missing key {path[-1]!r}")
    if error["type"] in _TYPES and not path:
        return Problem(path, f"a policy is a mapping of {_TOP_KEYS}, not {error['input']!r}")
    prefix = f"{field(path)}: " if field(path) else ""
    if error["type"] in _TYPES:
        expected = _TYPES[error["type"]]
        return Problem(path, f"{prefix}expected {expected}, got {error['input']!r}")
    return Problem(path, prefix + error["msg"])
