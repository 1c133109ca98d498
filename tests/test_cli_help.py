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


def test_every_option_says_what_it_does() -> None:
    """No option's --help line is bare (``--json`` alone, ``--timeout FLOAT`` alone)."""
    bare = []
    for path in commands(main):
        command = main
        ctx = click.Context(main)
        for name in path:
            assert isinstance(command, click.Group)
            found = command.get_command(ctx, name)
            assert found is not None, path
            command = found
        bare += [
            f"mesh {' '.join(path)} {option.opts[0]}"
            for option in command.params
            if isinstance(option, click.Option) and not option.help and not option.hidden
        ]
    assert bare == []
