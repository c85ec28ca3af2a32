"""``python -m shmstore demo``: runs, reports, and always cleans up -- Ctrl-C included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import _our_objects


def demo(*args: str, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shmstore", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,  # type: ignore[call-overload]
    )


def test_demo_runs_reports_and_cleans_up() -> None:
    before = _our_objects()
    proc = demo("--seconds", "1.5", "--readers", "2", "--rate", "500")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "commits/s" in out
    assert "get p50" in out
    assert "removed the store" in err
    assert _our_objects() == before


def test_ctrl_c_stops_everything_and_leaves_nothing() -> None:
    before = _our_objects()
    # Its own process group, so that SIGINT reaches the demo and its children as a terminal's
    # Ctrl-C would.
    proc = demo("--seconds", "60", "--readers", "2", start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:  # wait until it is really running: a first summary
        if "reader" in line and "get p50" in line:
            break
        assert time.monotonic() < deadline
    os.killpg(proc.pid, signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "Traceback" not in err
    assert _our_objects() == before


def test_cli_usage_errors_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shmstore", "demo", "--readers", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "must be at least 1" in result.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "shmstore", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--readers" in help_text
