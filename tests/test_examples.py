"""The examples run as documented and show what they claim."""

import os
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


@pytest.mark.parametrize(
    "script, package",
    [
        ("lightning_bounds.py", "lightning"),
        ("transformers_bounds.py", "transformers"),
        ("tensorboard_bounds.py", "tensorboard"),
    ],
)
def test_training_framework_examples_end_inside_the_bounds(script, package):
    pytest.importorskip(package)
    out = subprocess.run(
        [sys.executable, script],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bounded parameters are inside their bounds" in out.stdout
    assert "bounds" in out.stdout.splitlines()[0]  # the metrics were logged
