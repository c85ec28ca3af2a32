"""``shmstore demo``: runs, reports, and always cleans up -- Ctrl-C (once or twice), SIGTERM,
SIGHUP, a killed parent -- and never prints a traceback.

Each test runs the real console script in its own session (so that a signal to its process group
reaches the demo and its children as a terminal's Ctrl-C would), finds the demo's store by its
pid (``demo-<pid>``) and checks that nothing of *that* store is left in /dev/shm.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import objects_of
from test_cli import SCRIPT, cli, spawned, with_ctrl_c

from shmstore import Store
from shmstore._demo import ReaderReport, _render, run_demo
from shmstore.fsm import FsmSnapshotDTO, FsmState

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
    assert "get() p50" in out
    assert "s of 1.5 s" in out  # elapsed / total
    assert "removed the store" in err
    assert "Traceback" not in err
    assert not objects_of(name)


def _screen(**overrides: object) -> str:
    """One frame of the screen, as a terminal gets it (with the screen clear)."""
    with Store.private(FsmSnapshotDTO) as st:
        st.set(FsmSnapshotDTO(version=1, state=FsmState.IDLE))
        report = ReaderReport(
            reader=0,
            reads=100,
            changed_p50_ns=15_000,
            changed_p99_ns=40_000,
            unchanged_p50_ns=90,
            projection_p50_ns=4_000,
            lag=0,
            received=500,
            notices=2,
            last_notice="subscriber 'reader-0' is not keeping up",
        )
        options: dict[str, object] = {
            "name": "demo-1",
            "elapsed": 3.0,
            "seconds": 30.0,
            "rate": 1000.0,
            "st": st,
            "latest": {0: report},
            "readers": 1,
            "slow_reader": False,
            "clear": True,
        }
        out = io.StringIO()
        _render(out, **{**options, **overrides})  # type: ignore[arg-type]
        return out.getvalue()


def test_every_frame_explains_its_numbers_after_the_screen_clear() -> None:
    """The legend is part of each frame, after the clear: it never scrolls away or is wiped."""
    frame = _screen().rsplit("\x1b[2J", 1)[1]
    assert "3.0 s of 30 s" in frame
    assert "Ctrl-C stops the demo" in frame
    for column in ("reads/s", "changed", "unchanged", "projection", "lag", "recv/s", "notices"):
        assert f"    {column}" in frame, column  # each column has its line in the legend
    assert "10-30 us" in frame  # why a changed read of the 10 KB snapshot costs what it does
    assert "~70 ns" in frame
    assert "--slow-reader" in frame  # how to make the notices appear
    assert "15.00us (40.00us)" in frame
    assert "newest notice: subscriber 'reader-0'" in frame
    assert "(until Ctrl-C)" in _screen(seconds=0.0)


def test_seconds_0_runs_until_ctrl_c(demo: Demo) -> None:
    proc = demo("--seconds", "0", "--readers", "1")
    name = started(proc)
    running(proc)
    os.killpg(proc.pid, signal.SIGINT)
    returncode, err = finish(proc, name)
    assert returncode == 130, err


def test_slow_reader_makes_the_fsm_layers_notices_appear(demo: Demo) -> None:
    """``--slow-reader``: reader 0 drains its queue slowly, the FSM layer drops stale snapshots
    for it and warns, and the notices column counts the warnings."""
    proc = demo("--seconds", "0", "--readers", "2", "--slow-reader")
    name = started(proc)
    assert proc.stdout is not None
    deadline = time.monotonic() + HANG
    for line in proc.stdout:
        words = line.split()
        if line.strip().startswith("0 (slow)") and "us" in line and int(words[-1]) > 0:
            break
        assert time.monotonic() < deadline, "no notices"
    else:
        pytest.fail("the demo ended before its slow reader had notices")
    os.killpg(proc.pid, signal.SIGINT)
    returncode, err = finish(proc, name)
    assert returncode == 130, err


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
        (("--seconds", "-1"), "must be a positive finite number, or 0 to run until Ctrl-C"),
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
    assert "(30; 0: until Ctrl-C)" in help_text  # a default long enough to watch
    assert "--slow-reader" in help_text
