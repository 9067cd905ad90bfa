"""Every ```python block in README.md and docs/*.md runs as a test, each in a fresh interpreter.

Blocks must be self-contained: each runs alone, in a new Python process, with a temporary
folder as its working directory (``examples/`` of this repository is linked into it, so a
block can load ``examples/bounds.toml``; files a block writes are thrown away). Blocks that
must not run are fenced as ```bash, ```console or ```text.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser

ROOT = Path(__file__).resolve().parent
BLOCK_TIMEOUT_S = 1800  # a hang guard only: no block's verdict depends on its time


def run_in_fresh_interpreter(example):
    """Run one code block as a script in a new process; the failure message, or None."""
    source = "\n" * example.line + str(example.parsed)  # tracebacks give the Markdown line
    name = Path(example.path).relative_to(ROOT).as_posix().replace("/", "_").replace(".", "_")
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(ROOT / "examples", Path(tmp) / "examples")
        script = Path(tmp) / f"{name}.py"
        script.write_text(source)
        env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
    if out.returncode != 0:
        return f"the block exited with {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return None


pytest_collect_file = Sybil(
    parsers=[CodeBlockParser(language="python", evaluator=run_in_fresh_interpreter)],
    patterns=["README.md", "docs/*.md"],
    path=str(ROOT),
).pytest()
