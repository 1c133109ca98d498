"""Payload schemas from the policy, compiled once: which routing keys carry which schema
versions, and checking a message against them.

A message names the schema it was written against in ``x-mesh-schema`` as ``name@version``
(``reading@2``).  On a routing key the policy declares schemas for:

- a message naming one of the versions accepted there is checked against that version;
- one naming no schema, or one not accepted there, is refused, naming what is accepted (the
  gateway cannot guess which version a producer meant, and guessing would let an old
  producer's messages through unchecked once a new version is added);
- a payload that fails is refused with its JSON path and a reason that shows no values
  (``mesh.policy.violations``).

A key with no schema passes, whatever it names, unless a ``require`` pattern matches it.
Patterns apply to the mesh's own keys (``_req.``, ``_ctl.``, ``_registry.``) only when they
start with that prefix; requests are matched by ``request: {agent, operation}`` globs;
replies are never checked (their key does not say which operation they answer).  The mesh
writes its control commands and registry events itself and names no version, so an entry for
``_ctl.``/``_registry.`` keys accepts exactly one, which checks what names none.

Validators are Draft 2020-12 with format checking, built once per policy; lookups by routing
key are cached.  References (``$ref``) resolve within a schema only: nothing is fetched, and a
reference to anything else is refused at load.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic_core
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from pydantic import BaseModel, PydanticUserError
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from mesh import topology
from mesh.policy import globs
from mesh.policy.errors import Problem
from mesh.policy.model import PayloadSpec, SchemasSpec, SchemaVersionSpec
from mesh.policy.violations import describe, shown
from mesh.yamlfile import Location

if TYPE_CHECKING:
    from referencing._core import Resolver  # public only as what Registry.resolver returns

DRAFT = "https://json-schema.org/draft/2020-12/schema"
"""The only dialect a schema may declare in ``$schema`` (or it declares none)."""

LOOKUP_CACHE = 65_536
"""Routing keys whose expectation is kept, as the policy's decisions are."""

_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
"""Keywords whose values are data, not schemas: a ``$ref`` in them is no reference."""
_NOTHING_ELSE: Registry[Any] = Registry()
"""What references may reach besides the schema itself: nothing (jsonschema's default would
fetch unknown URLs over the network, from the gateway, per message)."""
_NEVER_CHECKED = ("_reply.", "_err.")
_UNNAMED_PREFIXES = ("_ctl.", "_registry.")
"""Keys whose messages the mesh writes itself, naming no schema version."""


class SchemaViolation(ValueError):
    """A message does not carry a payload its routing key accepts; the text says why."""


def schema_id(name: str, version: int) -> str:
    """What ``x-mesh-schema`` says for version ``version`` of schema ``name``."""
    return f"{name}@{version}"


@dataclass(frozen=True, slots=True, eq=False)
class SchemaVersion:
    """One version of a named schema, compiled (one object per version: compared by
    identity)."""

    name: str
    version: int
    schema: Mapping[str, Any] | bool
    source: str
    """Where it came from: ``inline``, ``file PATH``, ``model module:Model``."""
    validator: Validator = field(repr=False)

    @property
    def id(self) -> str:
        return schema_id(self.name, self.version)


@dataclass(frozen=True, slots=True)
class PayloadRule:
    """One ``payloads`` entry: topic patterns, or request globs, and what they accept."""

    index: int
    topics: tuple[str, ...]
    agent: str | None
    operation: str | None
    accepted: tuple[SchemaVersion, ...]
    line: int | None = None

    @property
    def target(self) -> str:
        if self.agent is not None:
            return f"requests to {self.agent} operation {self.operation}"
        return ", ".join(self.topics)

    def matches(self, routing_key: str) -> bool:
        if self.agent is None:
            return any(_applies(p, routing_key) for p in self.topics)
        words = routing_key.split(".")
        return (
            len(words) == 3
            and words[0] == "_req"
            and globs.matches(self.agent, words[1])
            and globs.matches(str(self.operation), words[2])
        )


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the payload on one routing key must follow: one of ``accepted`` (by schema id),
    or, with none, nothing: then a ``require`` pattern matched (``required_by``)."""

    routing_key: str
    accepted: Mapping[str, SchemaVersion]
    rule: PayloadRule | None
    required_by: str | None
    unnamed: SchemaVersion | None = None
    """What checks a message naming no version: on the mesh's own keys, their one version."""

    def check(self, named: str | None, body: bytes) -> SchemaVersion:
        """The schema version the message named, once its payload follows it.

        Raises ``SchemaViolation`` naming what is wrong and what the key accepts.
        """
        schema = self.version(named)
        try:
            payload = pydantic_core.from_json(body) if body else None
        except ValueError:
            raise SchemaViolation(f"the payload is not JSON ({schema.id})") from None
        self.validate(schema, payload)
        return schema

    def version(self, named: str | None) -> SchemaVersion:
        """The schema version ``named`` (``x-mesh-schema``) if the key accepts it; else
        ``SchemaViolation`` naming what it accepts."""
        key = self.routing_key
        if not self.accepted:
            raise SchemaViolation(
                f"the policy requires a schema on {key!r} (require: {self.required_by!r}) "
                "and declares none for it"
            )
        accepts = ", ".join(self.accepted)
        if named is None and self.unnamed is None:
            raise SchemaViolation(
                f"the message names no schema (x-mesh-schema); {key!r} accepts {accepts}"
            )
        schema = self.unnamed if named is None else self.accepted.get(named)
        if schema is None:
            raise SchemaViolation(
                f"x-mesh-schema {shown(named)} is not accepted on {key!r} (accepted: {accepts})"
            )
        return schema

    @staticmethod
    def validate(schema: SchemaVersion, payload: Any) -> None:
        """``SchemaViolation`` with the path and rule, no value, if ``payload`` fails ``schema``."""
        error = best_match(schema.validator.iter_errors(payload))
        if error is not None:
            raise SchemaViolation(f"{describe(error)} ({schema.id})")


class PayloadSchemas:
    """The policy's schemas, compiled: ask it what a routing key expects."""

    def __init__(
        self,
        definitions: Mapping[str, Mapping[int, SchemaVersion]],
        rules: tuple[PayloadRule, ...],
        require: tuple[str, ...],
    ) -> None:
        self.definitions = definitions
        """Schema name → version → the compiled schema."""
        self.rules = rules
        self.require = require
        self._expect = lru_cache(maxsize=LOOKUP_CACHE)(self._expect_uncached)

    @property
    def declared(self) -> bool:
        """Whether the policy says anything about payloads (else the gateway skips them)."""
        return bool(self.rules or self.require)

    def expectation(self, routing_key: str) -> Expectation | None:
        """What ``routing_key``'s payloads must follow; ``None`` when nothing applies."""
        return self._expect(routing_key)

    def _expect_uncached(self, routing_key: str) -> Expectation | None:
        if routing_key.startswith(_NEVER_CHECKED):
            return None
        rule = next((r for r in self.rules if r.matches(routing_key)), None)
        if rule is not None:
            accepted = {s.id: s for s in rule.accepted}
            own = routing_key.startswith(_UNNAMED_PREFIXES)
            unnamed = rule.accepted[0] if own and len(rule.accepted) == 1 else None
            return Expectation(routing_key, accepted, rule, None, unnamed)
        required_by = next((p for p in self.require if _applies(p, routing_key)), None)
        if required_by is None:
            return None
        return Expectation(routing_key, {}, None, required_by)


def _applies(pattern: str, routing_key: str) -> bool:
    # A pattern reaches the mesh's own keys only when it names their prefix itself.
    if routing_key.startswith("_") and not pattern.startswith("_"):
        return False
    return topology.matches(pattern, routing_key)


def compile_schemas(
    spec: SchemasSpec, base: Path, lines: Mapping[Location, int]
) -> tuple[PayloadSchemas, list[Problem]]:
    """Compile the ``schemas`` section; files are relative to ``base`` (the policy's folder).

    Returns the compiled schemas and every problem found, each at its path.
    """
    compiler = _Compiler(base, lines)
    definitions = compiler.definitions(spec.definitions)
    rules = tuple(compiler.rule(i, entry, definitions) for i, entry in enumerate(spec.payloads))
    compiler.disjoint(rules)
    return PayloadSchemas(definitions, rules, tuple(spec.require)), compiler.problems


class _Compiler:
    def __init__(self, base: Path, lines: Mapping[Location, int]) -> None:
        self.base = base
        self.lines = lines
        self.problems: list[Problem] = []
        self.declared: dict[str, list[int]] = {}

    def definitions(
        self, specs: Mapping[str, list[SchemaVersionSpec]]
    ) -> dict[str, dict[int, SchemaVersion]]:
        out: dict[str, dict[int, SchemaVersion]] = {}
        for name, versions in specs.items():
            out[name] = {}
            self.declared[name] = sorted({spec.version for spec in versions})
            first: dict[int, int] = {}
            for i, spec in enumerate(versions):
                path: Location = ("schemas", "definitions", name, i)
                if spec.version in first:
                    where = self._at(("schemas", "definitions", name, first[spec.version]))
                    self.problems.append(
                        Problem(
                            (*path, "version"),
                            f"schema {name!r}: version {spec.version} declared twice{where}",
                        )
                    )
                    continue
                first[spec.version] = i
                compiled = self._version(name, spec, path)
                if compiled is not None:
                    out[name][spec.version] = compiled
        return out

    def _version(
        self, name: str, spec: SchemaVersionSpec, path: Location
    ) -> SchemaVersion | None:
        what = f"schema {schema_id(name, spec.version)}"
        try:
            schema = self._load(spec)
        except _Refused as exc:
            key = next(k for k in SchemaVersionSpec.SOURCES if getattr(spec, k) is not None)
            self.problems.append(Problem((*path, key), f"{what}: {exc}"))
            return None
        where: Location = (*path, "inline") if spec.inline is not None else path
        problem = _invalid(schema)
        if problem is not None:
            inside, reason = problem
            # Inline, the line is the offending keyword's; from a file or model, the entry's.
            at = (*where, *inside) if spec.inline is not None else where
            self.problems.append(Problem(at, f"{what} ({spec.source}): {reason}"))
            return None
        validator = Draft202012Validator(
            schema, registry=_NOTHING_ELSE, format_checker=Draft202012Validator.FORMAT_CHECKER
        )
        return SchemaVersion(name, spec.version, schema, spec.source, validator)

    def _load(self, spec: SchemaVersionSpec) -> Mapping[str, Any] | bool:
        if spec.file is not None:
            return _from_file(self.base / spec.file)
        if spec.model is not None:
            return _from_model(spec.model)
        try:
            json.dumps(spec.inline, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise _Refused(f"not JSON ({exc}): quote dates and times") from None
        inline: Mapping[str, Any] | bool = spec.inline
        return inline

    def rule(
        self, index: int, spec: PayloadSpec, definitions: Mapping[str, Mapping[int, SchemaVersion]]
    ) -> PayloadRule:
        accepted: list[SchemaVersion] = []
        for j, ref in enumerate(spec.accept):
            path: Location = ("schemas", "payloads", index, "accept", j)
            name, _, version = ref.partition("@")
            versions = definitions.get(name)
            if versions is None:
                known = ", ".join(definitions) or "none"
                self.problems.append(Problem(path, f"unknown schema {name!r} (schemas: {known})"))
                continue
            if not version:
                accepted.extend(versions[v] for v in sorted(versions))
            elif int(version) in versions:
                accepted.append(versions[int(version)])
            else:
                have = ", ".join(str(v) for v in self.declared[name]) or "none"
                self.problems.append(
                    Problem(path, f"schema {name!r} has no version {version} (versions: {have})")
                )
        own = [p for p in spec.topics or () if p.startswith(_UNNAMED_PREFIXES)]
        if own and len(dict.fromkeys(accepted)) != 1:
            self.problems.append(
                Problem(
                    ("schemas", "payloads", index, "accept"),
                    f"{own[0]!r}: the mesh writes these messages itself and names no schema "
                    "version, so the entry accepts exactly one",
                )
            )
        request = spec.request
        return PayloadRule(
            index=index,
            topics=tuple(spec.topics or ()),
            agent=request.agent if request is not None else None,
            operation=request.operation if request is not None else None,
            accepted=tuple(dict.fromkeys(accepted)),
            line=self.lines.get(("schemas", "payloads", index)),
        )

    def disjoint(self, rules: tuple[PayloadRule, ...]) -> None:
        """Two entries about one routing key would leave its schema to guesswork: refused."""
        for later, rule in enumerate(rules):
            for earlier in rules[:later]:
                clash = _overlap(earlier, rule)
                if clash is None:
                    continue
                at = f" (line {earlier.line})" if earlier.line is not None else ""
                self.problems.append(
                    Problem(
                        ("schemas", "payloads", rule.index),
                        f"payload entry {rule.index + 1} ({rule.target}): {clash} of entry "
                        f"{earlier.index + 1}{at}: one routing key would have two entries; "
                        "make them disjoint",
                    )
                )

    def _at(self, path: Location) -> str:
        line = self.lines.get(path)
        return f" (first at line {line})" if line is not None else ""


def _overlap(first: PayloadRule, second: PayloadRule) -> str | None:
    if first.agent is not None and second.agent is not None:
        assert first.operation is not None and second.operation is not None
        if globs.overlap(first.agent, second.agent) and globs.overlap(
            first.operation, second.operation
        ):
            return "its requests overlap those"
        return None
    for mine in second.topics:
        for theirs in first.topics:
            if mine.startswith("_") == theirs.startswith("_") and topology.overlap(mine, theirs):
                return f"topics {mine!r} overlap {theirs!r}"
    return None


class _Refused(Exception):
    """A schema source cannot be read; the text says why."""


def _from_file(path: Path) -> Mapping[str, Any] | bool:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _Refused(f"file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _Refused(f"cannot read {path}: {exc}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
            json.dumps(data, allow_nan=False)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Refused(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        raise _Refused(f"{path}: not valid YAML: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise _Refused(f"{path}: not JSON ({exc}): quote dates and times") from None
    if not isinstance(data, dict | bool):
        raise _Refused(f"{path} holds {type(data).__name__}, not a JSON Schema (an object)")
    return data


def _from_model(spec: str) -> Mapping[str, Any]:
    """A pydantic model's JSON Schema (``module:Model``, importable as ``mesh run``'s)."""
    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # whatever importing it raised, the policy names it
        raise _Refused(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    model = getattr(module, name, None)
    if model is None:
        raise _Refused(f"module {module_name!r} has no {name!r}")
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise _Refused(f"{spec!r} is no pydantic model (a BaseModel subclass)")
    try:
        return model.model_json_schema()
    except PydanticUserError as exc:
        raise _Refused(f"{spec!r} has no JSON Schema: {exc}") from None


def _invalid(schema: Mapping[str, Any] | bool) -> tuple[Location, str] | None:
    """Where and why ``schema`` is no valid Draft 2020-12 schema, or ``None``."""
    if isinstance(schema, bool):
        return None
    dialect = schema.get("$schema")
    if dialect is not None and str(dialect).rstrip("#") != DRAFT:
        return ("$schema",), f"schemas are Draft 2020-12 ({DRAFT}), not {shown(dialect)}"
    meta = Draft202012Validator(
        Draft202012Validator.META_SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    error = best_match(meta.iter_errors(schema))
    if error is not None:
        inside = tuple(error.absolute_path)
        where = "/".join(str(p) for p in inside)
        return inside, f"not a valid JSON Schema{f' at {where}' if where else ''}: {error.message}"
    resource = DRAFT202012.create_resource(schema)
    for inside, ref, resolver in _references(schema, _NOTHING_ELSE.resolver_with_root(resource)):
        try:
            resolver.lookup(ref)
        except Unresolvable:
            where = "/".join(str(p) for p in inside)
            return inside, (
                f"$ref {ref!r} at {where or 'the top'} resolves to nothing: references "
                "reach within the schema only"
            )
    return None


def _references(
    node: Any, resolver: Resolver[Any], path: Location = ()
) -> Iterator[tuple[Location, str, Resolver[Any]]]:
    # Every $ref and $dynamicRef with the resolver of its scope ($id changes the base).
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _references(item, resolver, (*path, i))
        return
    if not isinstance(node, dict):
        return
    if path and isinstance(node.get("$id"), str):
        resolver = resolver.in_subresource(DRAFT202012.create_resource(node))
    for keyword in ("$ref", "$dynamicRef"):
        if isinstance(node.get(keyword), str):
            yield path, node[keyword], resolver
    for key, value in node.items():
        if key not in _DATA_KEYWORDS:
            yield from _references(value, resolver, (*path, key))
