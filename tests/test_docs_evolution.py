"""docs/evolution.md's examples run as written, twice (they clean up after themselves)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parent.parent / "docs" / "evolution.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.mark.parametrize("block", BLOCKS)
def test_example_runs_twice(block: str) -> None:
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", block], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr
