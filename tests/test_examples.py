"""The examples run as documented and show what they claim."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    "script", ["bounds_penalty.py", "bounds_project.py", "bounds_reparametrize.py"]
)
def test_each_use_ends_inside_the_bounds(script):
    out = subprocess.run(
        [sys.executable, script], cwd=EXAMPLES, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "all 3 bounded parameters are inside their bounds" in out.stdout
