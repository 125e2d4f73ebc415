"""Every example script runs to the end (random weights: the hub is unreachable here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script):
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])


def test_every_example_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert EXAMPLES and [p.name for p in EXAMPLES if f"examples/{p.name}" not in readme] == []
