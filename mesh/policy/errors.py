"""What is wrong with a policy, and where: problems located by path and, once known, line."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from mesh.yamlfile import Location, line_of


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a policy: where (path, line once known) and why."""

    path: Location
    message: str
    line: int | None = None

    def where(self) -> str:
        """The part of the policy ``path`` names, as a reader would say it."""
        return describe(self.path)


class PolicyError(ValueError):
    """The policy is invalid; each problem is one line ``file:line: where: reason``."""

    def __init__(self, problems: Iterable[Problem], source: str | None = None) -> None:
        self.problems = sorted(problems, key=lambda p: (p.line or 0, repr(p.path)))
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        out = []
        for problem in self.problems:
            parts = [self.source or "policy"]
            if problem.line is not None:
                parts[0] += f":{problem.line}"
            if problem.where():
                parts.append(problem.where())
            out.append(": ".join([*parts, problem.message]))
        return out

    def located(self, source: str, lines: Mapping[Location, int]) -> PolicyError:
        """The same problems with the file name and the line of each path (or its nearest
        enclosing value that has one)."""
        return PolicyError((replace(p, line=line_of(p.path, lines)) for p in self.problems), source)


def describe(path: Location) -> str:
    """``("rule_sets", "telemetry", "rules", 2, "allow")`` → ``telemetry rule 3``."""
    depth = _depth(path)
    if depth == 4:
        assert isinstance(path[3], int)
        return f"{path[1]} rule {path[3] + 1}"
    if depth == 2:
        what = {
            "principals": "principal",
            "roles": "role",
            "rule_sets": "rule set",
            "rate_limits": "rate limit",
        }[str(path[0])]
        return f"{what} {path[1]!r}"
    return ""


def field(path: Location) -> str:
    """The key ``path`` names inside what ``describe`` names: ``agents``, ``request.agent``."""
    return ".".join(part for part in path[_depth(path) :] if isinstance(part, str))


def _depth(path: Location) -> int:
    # How much of the path describe() names: a rule, a principal, role or rule set, or nothing.
    if len(path) >= 4 and path[0] == "rule_sets" and path[2] == "rules":
        return 4
    if len(path) >= 2 and path[0] in ("principals", "roles", "rule_sets", "rate_limits"):
        return 2
    return 0
