"""cnnctl/cli.py: the console script, `python -m cnnctl`, and the command list `--help` shows."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import click
import pytest

from cnnctl import __version__
from cnnctl.cli import COMMANDS, cli


def test_console_script_is_cnnctl_cli_main() -> None:
    [script] = entry_points(group="console_scripts", name="cnnctl")
    assert script.value == "cnnctl.cli:main"


@pytest.mark.parametrize("width", [60, 100])
def test_help_lists_each_command_with_its_own_summary(width: int) -> None:
    """The listing from COMMANDS' summaries reads exactly as click's listing of the real
    commands (each one's docstring), which imports every stage."""
    ctx = click.Context(cli, info_name="cnnctl", terminal_width=width)

    def render(format_commands) -> str:  # type: ignore[no-untyped-def]
        formatter = ctx.make_formatter()
        format_commands(ctx, formatter)
        return formatter.getvalue()

    lazy = render(cli.format_commands)
    assert lazy == render(lambda c, f: click.Group.format_commands(cli, c, f))
    assert [line.split()[0] for line in lazy.splitlines()[1:]] == sorted(COMMANDS)


def test_python_m_cnnctl_runs_the_group() -> None:
    r = subprocess.run([sys.executable, "-m", "cnnctl", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"cnnctl, version {__version__}\n")
