"""What is wrong with a mesh spec, and where: ``mesh.yaml:12: agents[1].replicas: reason``."""

from __future__ import annotations

from collections.abc import Iterable

from mesh.yamlfile import Location, YamlProblem


class SpecError(ValueError):
    """The mesh spec is invalid; each problem is one line ``file:line: path: reason``."""

    def __init__(self, problems: Iterable[YamlProblem], source: str) -> None:
        self.problems = sorted(problems, key=lambda p: (p[2] or 0, repr(p[0])))
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        out = []
        for path, message, line in self.problems:
            where = self.source if line is None else f"{self.source}:{line}"
            out.append(": ".join(part for part in (where, dotted(path), message) if part))
        return out


def dotted(path: Location) -> str:
    """``("agents", 1, "replicas")`` → ``agents[1].replicas``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out
