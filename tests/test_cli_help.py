"""Every ``mesh`` command's ``--help`` shows how it is used."""

from __future__ import annotations

from collections.abc import Iterator

import click
from click.testing import CliRunner

from mesh.cli import main


def commands(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of ``command`` and of every command under it (lazy ones imported)."""
    yield path
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            yield from commands(sub, (*path, name))


def test_every_command_help_has_an_example() -> None:
    """Each command and group, nested ones too, has an example of itself in its --help."""
    paths = list(commands(main))
    assert {("publish",), ("tail",), ("agents", "show"), ("behaviour", "stop")} <= set(paths)
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        examples = result.output.partition("Examples:")[2]
        assert examples, f"mesh {' '.join(path)} --help has no Examples"
        assert f"mesh {' '.join(path)}".strip() in examples, (path, examples)
