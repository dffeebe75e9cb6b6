"""Every `cbir` command's --help, at 80 columns, shows every flag's name whole."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from service.cli import app


def _commands(group, path: tuple[str, ...] = ()):
    yield path, group
    if hasattr(group, "commands"):
        for name, sub in group.commands.items():
            yield from _commands(sub, (*path, name))


def test_help_at_80_columns_shows_every_flag_whole():
    root = typer.main.get_command(app)
    runner = CliRunner()
    seen = 0
    for path, command in _commands(root):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"},
                               terminal_width=80)
        assert result.exit_code == 0, (path, result.output)
        for param in command.params:
            for flag in [*param.opts, *param.secondary_opts]:
                if flag == "--help":
                    continue
                assert flag in result.output, (path, flag)
        assert "…" not in result.output, path
        seen += 1
    assert seen > 10
