"""What a payload that fails its schema is told: where, and why, without its values.

A reason travels far: to the sender, into the dead letter's ``x-mesh-reason``, the gateway's
log and the audit trail, all read by people who may not see payloads.  So it never echoes a
value of the payload (a string may be a secret, a number an account): it names the value's
JSON type and the rule it broke, with the rule's own bounds and patterns (the schema is no
secret).  Property names do appear, shortened, as in the path: they are the payload's shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from jsonschema.exceptions import ValidationError

NAME_CHARS = 32
"""Property names and schema values are shown up to this many characters."""
NAMES_SHOWN = 3
"""At most this many property names (or enum values) in one reason."""
REASON_CHARS = 240
"""A reason is cut to this length."""

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def describe(error: ValidationError, root: str = "payload") -> str:
    """``payload.speed_kmh: a string is not of type 'number'`` for ``error``."""
    reason = f"{json_path(error.absolute_path, root)}: {_reason(error)}"
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 1] + "…"


def json_path(path: Iterable[str | int], root: str = "payload") -> str:
    """``payload.items[2].name``; names that are no identifiers in brackets, shortened."""
    out = root
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part) and len(part) <= NAME_CHARS:
            out += f".{part}"
        else:
            out += f"[{shown(part)}]"
    return out


def kind(value: Any) -> str:
    """The JSON type of ``value`` as a reason names it: ``a string``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def shown(value: Any) -> str:
    """A schema value or property name as a reason shows it: its repr, shortened."""
    text = repr(value)
    return text if len(text) <= NAME_CHARS else text[: NAME_CHARS - 1] + "…"


def _listing(values: Iterable[Any]) -> str:
    items = list(values)
    text = ", ".join(shown(v) for v in items[:NAMES_SHOWN])
    return text + (f" and {len(items) - NAMES_SHOWN} more" if len(items) > NAMES_SHOWN else "")


def _reason(error: ValidationError) -> str:
    # Any: jsonschema types these as possibly unset, which a raised error never leaves them.
    keyword: Any = error.validator
    expected: Any = error.validator_value
    value: Any = error.instance
    schema: Any = error.schema
    what = kind(value)
    if "propertyNames" in error.absolute_schema_path:
        what = "a property name"
    simple = _SIMPLE.get(str(keyword))
    if simple is not None:
        return f"{what} {simple.format(shown(expected))}"
    if keyword == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        return f"{what} is not of type {' or '.join(shown(t) for t in types)}"
    if keyword == "required" and isinstance(value, Mapping):
        missing = [name for name in expected if name not in value]
        plural = "properties" if len(missing) > 1 else "property"
        verb = "are" if len(missing) > 1 else "is"
        return f"required {plural} {_listing(missing)} {verb} missing"
    if keyword == "additionalProperties" and isinstance(value, Mapping):
        extra = _unexpected(value, schema)
        plural = "properties" if len(extra) > 1 else "property"
        return f"unexpected {plural} {_listing(extra)}"
    if keyword == "dependentRequired" and isinstance(value, Mapping):
        for name, needed in expected.items():
            missing = [n for n in needed if name in value and n not in value]
            if missing:
                return f"property {_listing(missing)} is required when {shown(name)} is present"
    if keyword == "enum":
        return f"{what} is not one of {_listing(expected)}"
    if keyword is None:  # the schema ``false``
        return "no value is allowed here"
    return f"{what} does not satisfy {shown(keyword)}"


_SIMPLE: dict[str, str] = {
    "const": "is not {}",
    "format": "is not a valid {}",
    "pattern": "does not match {}",
    "minLength": "is shorter than {} characters",
    "maxLength": "is longer than {} characters",
    "minimum": "is less than the minimum of {}",
    "maximum": "is greater than the maximum of {}",
    "exclusiveMinimum": "is not greater than {}",
    "exclusiveMaximum": "is not less than {}",
    "multipleOf": "is not a multiple of {}",
    "minItems": "has fewer than {} items",
    "maxItems": "has more than {} items",
    "minProperties": "has fewer than {} properties",
    "maxProperties": "has more than {} properties",
    "minContains": "has fewer than {} items matching 'contains'",
    "maxContains": "has more than {} items matching 'contains'",
    "contains": "has no item matching 'contains'",
    "uniqueItems": "has repeated items",
    "anyOf": "matches none of the 'anyOf' schemas",
    "oneOf": "does not match exactly one of the 'oneOf' schemas",
    "not": "matches the 'not' schema",
    "unevaluatedProperties": "has properties the schema does not allow",
    "unevaluatedItems": "has items the schema does not allow",
    "items": "has more items than the schema allows",
}


def _unexpected(value: Mapping[str, Any], schema: Mapping[str, Any] | bool) -> list[str]:
    # The names additionalProperties refused: neither in properties nor patternProperties.
    if not isinstance(schema, Mapping):
        return list(value)
    known = schema.get("properties", {})
    patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
    return [
        name
        for name in value
        if name not in known and not any(p.search(name) for p in patterns)
    ]
