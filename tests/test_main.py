"""``parambounds`` and ``python -m parambounds`` with no command print the help."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parambounds import cli

SCRIPT = str(Path(sys.executable).parent / "parambounds")


@pytest.mark.parametrize(
    "command", [[SCRIPT], [sys.executable, "-m", "parambounds"]], ids=["script", "module"]
)
def test_no_command_prints_the_help_and_exits_0(command):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: parambounds ")
    for name in ("check", "clamp", "demo"):
        assert name in out.stdout
    assert out.stderr == ""


def test_main_with_an_empty_argv_prints_the_help(capsys):
    assert cli.main([]) == 0
    assert capsys.readouterr().out == cli.build_parser().format_help()


def test_an_unknown_command_is_still_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
