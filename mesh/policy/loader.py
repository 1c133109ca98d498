"""Reading ``policy.yaml``: YAML with the line of every value, so each problem names its line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from mesh.policy.errors import PolicyError, Problem, field
from mesh.policy.model import PolicyFile
from mesh.policy.policy import Policy
from mesh.yamlfile import TYPES, Location, YamlError, explain, read_yaml

_TOP_KEYS = ", ".join(PolicyFile.model_fields)


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
        data, lines = read_yaml(text)
    except YamlError as exc:
        raise PolicyError([Problem(*problem) for problem in exc.problems], source) from None
    if data is None:
        raise PolicyError([Problem((), f"empty policy (expected {_TOP_KEYS})", 1)], source)
    return data, lines


def _problem(error: ErrorDetails) -> Problem:
    if error["type"] in TYPES and not error["loc"]:
        return Problem((), f"a policy is a mapping of {_TOP_KEYS}, not {error['input']!r}")
    return Problem(*explain(error, field))
