"""``shmstore doctor`` without namespaces (the container cases are in ``test_containers.py``)."""

from __future__ import annotations

import subprocess
import sys

from test_multiprocess import JOIN

from shmstore._doctor import MIN_OPEN_FILES, Check


def test_a_low_open_files_limit_fails_with_a_fix() -> None:
    script = (
        "import resource, sys; from shmstore._cli import main; "
        "_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
        "sys.exit(main(['doctor']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=JOIN, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [x for x in result.stdout.splitlines() if "open-files limit" in x]
    assert line.startswith(f"FAIL  open-files limit: 256 (below {MIN_OPEN_FILES})")
    assert "-- fix: raise it: ulimit -n" in line
    assert result.stdout.splitlines()[-1] == "1 check(s) failed"


def test_a_check_is_one_line_with_its_fix_unless_it_is_ok() -> None:
    assert Check("x", "ok", "fine", "do y").line() == "ok    x: fine"
    assert Check("x", "warn", "hmm", "do y").line() == "warn  x: hmm -- fix: do y"
    assert Check("x", "fail", "bad", "do y").line() == "FAIL  x: bad -- fix: do y"
