"""``shmstore demo``: runs, reports, and always cleans up -- Ctrl-C (once or twice), SIGTERM,
SIGHUP, a killed parent -- and never prints a traceback.

Each test runs the real console script in its own session (so that a signal to its process group
reaches the demo and its children as a terminal's Ctrl-C would), finds the demo's store by its
pid (``demo-<pid>``) and checks that nothing of *that* store is left in /dev/shm.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import objects_of
from test_cli import SCRIPT, cli, spawned, with_ctrl_c

from shmstore._demo import run_demo

HANG = 120  # seconds: bounds a hang, never a duration
Demo = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def demo() -> Iterator[Demo]:
    """Starts ``shmstore demo ARGS`` in its own session; kills what is left of it at the end."""
    with contextlib.ExitStack() as stack:
        yield lambda *args: stack.enter_context(
            spawned(with_ctrl_c(SCRIPT, "demo", *args), new_session=True)
        )


def started(proc: subprocess.Popen[str]) -> str:
    """Wait for the line saying the store exists and the children are starting; the store's
    name. The children are still importing when it is printed."""
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "created store" in line, line
    name = f"demo-{proc.pid}"
    assert repr(name) in line
    return name


def running(proc: subprocess.Popen[str]) -> None:
    """Wait until every reader has reported once: the demo is fully up."""
    assert proc.stdout is not None
    deadline = time.monotonic() + HANG
    for line in proc.stdout:
        if line.strip().startswith("0 ") and "us" in line:  # reader 0's first real row
            return
        assert time.monotonic() < deadline
    pytest.fail("the demo ended before its readers reported")


def finish(proc: subprocess.Popen[str], name: str) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=HANG)
    assert "Traceback" not in err, err
    assert not objects_of(name), f"the demo left {objects_of(name)} behind"
    return proc.returncode, err


def test_demo_runs_reports_and_cleans_up(demo: Demo) -> None:
    proc = demo("--seconds", "1.5", "--readers", "2", "--rate", "500")
    name = started(proc)
    out, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, err
    assert "commits/s" in out
    assert "get p50" in out
    assert "removed the store" in err
    assert "Traceback" not in err
    assert not objects_of(name)


def group(sig: signal.Signals) -> Callable[[int], None]:
    return lambda pid: os.killpg(pid, sig)


def only_parent(sig: signal.Signals) -> Callable[[int], None]:
    return lambda pid: os.kill(pid, sig)


@pytest.mark.parametrize(
    ("send", "code", "word"),
    [
        (group(signal.SIGINT), 130, "interrupted"),  # Ctrl-C in a terminal
        (only_parent(signal.SIGTERM), 143, "terminated"),  # kill PID, systemd, docker stop
        (group(signal.SIGHUP), 143, "terminated"),  # the terminal closed
    ],
    ids=["ctrl-c", "sigterm", "sighup-group"],
)
def test_a_stop_signal_once_running_stops_everything_and_leaves_nothing(
    demo: Demo, send: Callable[[int], None], code: int, word: str
) -> None:
    proc = demo("--seconds", "120", "--readers", "2")
    name = started(proc)
    running(proc)
    send(proc.pid)
    returncode, err = finish(proc, name)
    assert returncode == code, err
    assert word in err


def test_ctrl_c_while_children_are_still_importing_prints_no_traceback(demo: Demo) -> None:
    proc = demo("--seconds", "120", "--readers", "3")
    name = started(proc)  # printed right after the children were started: they are importing
    os.killpg(proc.pid, signal.SIGINT)
    returncode, err = finish(proc, name)
    assert returncode == 130, err
    assert "KeyboardInterrupt" not in err


@pytest.mark.parametrize("when", ["importing", "running"])
def test_second_ctrl_c_during_cleanup_still_removes_the_store(demo: Demo, when: str) -> None:
    proc = demo("--seconds", "120", "--readers", "2")
    name = started(proc)
    if when == "running":
        running(proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.01)  # not synchronization: a second press, as impatient hands do it
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGTERM)
    returncode, err = finish(proc, name)
    assert returncode in (130, 143), err


def test_killed_parent_is_cleaned_up_after_by_its_children(demo: Demo) -> None:
    proc = demo("--seconds", "120", "--readers", "2")
    name = started(proc)
    running(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=HANG)
    # The orphaned children notice within a loop turn; poll, since nothing signals us.
    deadline = time.monotonic() + HANG
    while objects_of(name) or _session_alive(proc.pid):
        assert time.monotonic() < deadline, f"left behind: {objects_of(name)}"
        time.sleep(0.05)


def _session_alive(sid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    return True
            except OSError:
                continue
    return False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--readers", "0"), "must be at least 1"),
        (("--readers", "x"), "expected a whole number, got 'x'"),
        (("--readers", "100000"), "at most 256 reader processes"),
        (("--seconds", "nan"), "must be a positive finite number"),
        (("--seconds", "-1"), "must be a positive finite number"),
        (("--rate", "inf"), "must be a positive finite number"),
        (("--rate", "nan"), "must be a positive finite number"),
        (("--rate", "1e12"), "at most 1000000 per second"),
    ],
)
def test_bad_options_are_usage_errors(args: tuple[str, ...], message: str) -> None:
    result = cli("demo", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "_positive" not in result.stderr  # no helper names in argparse's messages
    assert "Traceback" not in result.stderr


def test_run_demo_refuses_bad_options_before_creating_anything() -> None:
    for kwargs in ({"seconds": float("nan")}, {"rate": float("inf")}, {"readers": 0}):
        with pytest.raises(ValueError, match="must be"):  # one line, before anything exists
            run_demo(**kwargs)  # type: ignore[arg-type]
        assert not objects_of(f"demo-{os.getpid()}")


def test_demo_help() -> None:
    help_text = cli("demo", "--help").stdout
    assert "--readers" in help_text
