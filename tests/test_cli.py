"""The ``shmstore`` console script, run for real in subprocesses."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import posix_ipc
import pytest
from conftest import objects_of
from test_multiprocess import JOIN
from test_waiting import wait_for_registrations
from workers import Point, block_forever_in_wait, create_and_leave

import shmstore
from shmstore import Store
from shmstore._inventory import find_orphans, gc_verdict, parse_duration
from shmstore._names import semaphore_prefix

SCRIPT = str(Path(sys.executable).parent / "shmstore")
TESTS = str(Path(__file__).parent)
HANG = 600  # seconds: bounds a hang of a benchmark run on a loaded machine, never a duration


def cli(
    *args: str, stdin: str | bytes | None = None, timeout: float = JOIN
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": TESTS}
    result = subprocess.run(
        [SCRIPT, *args],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        capture_output=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def with_ctrl_c(*argv: str) -> list[str]:
    """*argv* run with SIGINT at its default, whatever we inherited: a runner that started the
    suite as a background job (``pytest &``) hands it SIGINT ignored, and a program keeps it
    that way. The shim execs, so the pid is the program's."""
    shim = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    shim += "os.execv(sys.argv[1], sys.argv[1:])"
    return [sys.executable, "-c", shim, *argv]


@contextlib.contextmanager
def spawned(argv: list[str], *, new_session: bool = False) -> Iterator[subprocess.Popen[str]]:
    """A program under test, with pipes; killed (its whole session, if it has one) and reaped
    however the test ends, so that a failure cannot leave it running into later tests."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            if new_session:
                os.killpg(proc.pid, signal.SIGKILL)  # the children too, if any are left
            elif proc.poll() is None:
                proc.kill()
        proc.communicate(timeout=JOIN)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("shmstore: ")
    return lines[0]


def test_ls_and_stat(store_name: str) -> None:
    with Store.create(store_name, dict[str, int], slots=4) as st:
        st.set({"a": 1})
        listing = cli("ls")
        assert listing.returncode == 0
        assert any(line.startswith(store_name) for line in listing.stdout.splitlines())
        rows = json.loads(cli("ls", "--json").stdout)
        (mine,) = [r for r in rows if r["name"] == store_name]
        assert (mine["version"], mine["slots"], mine["type"]) == (1, 4, "dict[str, int]")
        assert mine["fingerprint"] == st._info.fingerprint.hex()
        stat = json.loads(cli("stat", store_name, "--json").stdout)
        assert stat["commits"] == 1
        assert stat["writer_lock_held"] is False
        assert stat["readers_dead"] == 0
        prom = cli("stat", store_name, "--prometheus").stdout
        assert f'shmstore_version{{store="{store_name}",type="dict[str, int]"}} 1' in prom
        assert "version" in cli("stat", store_name).stdout


def test_get(store_name: str) -> None:
    with Store.create(store_name, Point) as st:
        st.set(Point(1, 2))
        assert json.loads(cli("get", store_name).stdout) == {"x": 1, "y": 2}
        got = json.loads(cli("get", store_name, "--version").stdout)
        assert got == {"version": 1, "value": {"x": 1, "y": 2}}


def test_set_untyped_typed_and_cas(store_name: str) -> None:
    with Store.create(store_name) as raw:
        result = cli("set", store_name, '{"any": [1, 2]}')
        assert result.returncode == 0
        assert json.loads(result.stdout) == {"version": 1}
        assert raw.get() == {"any": [1, 2]}
        assert cli("set", store_name, "-", stdin="[3]").returncode == 0
        assert raw.get_with_version() == ([3], 2)
        conflict = cli("set", store_name, "4", "--expect", "1")
        assert conflict.returncode == 3
        assert "expected version 1, store is at version 2" in one_line_error(conflict)
        assert cli("set", store_name, "4", "--expect", "2").returncode == 0
    shmstore.remove(store_name)
    with Store.create(store_name, Point) as typed:
        # Without --type the value is checked against the store's recorded type (issue 21).
        refused = cli("set", store_name, '{"x": 1, "y": "two"}')
        assert refused.returncode == 1
        assert "would not decode as workers:Point" in one_line_error(refused)
        assert typed.get_with_version() == (None, 0)
        ok = cli("set", store_name, '{"x": 1, "y": 2}', "--type", "workers:Point")
        assert ok.returncode == 0, ok.stderr
        assert typed.get() == Point(1, 2)
        invalid = cli("set", store_name, '{"x": "one"}', "--type", "workers:Point")
        assert invalid.returncode == 1
        assert "not valid" in one_line_error(invalid)
        wrong = cli("set", store_name, "{}", "--type", "workers:Nope")
        assert "cannot import" in one_line_error(wrong)
        assert typed.get_with_version() == (Point(1, 2), 1)


def test_errors_are_one_line(store_name: str) -> None:
    for args in (("get", store_name), ("stat", store_name), ("rm", store_name)):
        result = cli(*args)
        assert result.returncode == 1
        assert "no store named" in one_line_error(result)
    assert cli("get", "bad/name").returncode == 2  # a usage error (issue 20)
    assert cli("frobnicate").returncode == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("stat", "a/b"), "must not contain '/'"),
        (("get", ""), "must not be empty"),
        (("rm", "x" * 100), "100 bytes long; the limit is 64"),
        (("set", "a/b", "1"), "must not contain '/'"),
        (("watch", "tab\there"), "printable and without whitespace"),
    ],
)
def test_bad_store_names_are_one_line_errors(args: tuple[str, ...], message: str) -> None:
    result = cli(*args)
    assert result.returncode == 2  # usage (issue 20, item 14)
    assert message in one_line_error(result)


def test_set_refuses_bad_types_and_bad_input_in_one_line(store_name: str) -> None:
    with Store.create(store_name) as st:
        not_a_type = cli("set", store_name, '{"x": 1}', "--type", "os:path")
        assert not_a_type.returncode == 1
        assert "is not a type a store can hold" in one_line_error(not_a_type)
        broken = cli("set", store_name, "{}", "--type", "json:nope.deeper")
        assert "cannot import" in one_line_error(broken)
        malformed = cli("set", store_name, "{}", "--type", "no-colon")
        assert malformed.returncode == 2
        assert "module:Name" in one_line_error(malformed)
        latin1 = cli("set", store_name, "-", stdin=b'"caf\xe9"')
        assert latin1.returncode == 1
        assert "standard input is not UTF-8" in one_line_error(latin1)
        not_json = cli("set", store_name, "{oops")
        assert not_json.returncode == 1
        assert "not valid" in one_line_error(not_json)
        assert st.version == 0  # nothing was written
        assert cli("set", store_name, "-", stdin='"caf\u00e9"'.encode()).returncode == 0
        assert st.get() == "caf\u00e9"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("watch", "x", "--after", "soon"), "expected a version number, got 'soon'"),
        (("set", "x", "1", "--expect", "-1"), "a version is >= 0"),
        (("gc", "--older-than", "a while"), "expected a duration like 90s"),
        (("demo", "--readers", "many"), "expected a whole number, got 'many'"),
    ],
)
def test_usage_errors_talk_about_the_value_not_a_helper(
    args: tuple[str, ...], message: str
) -> None:
    result = cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "invalid" not in result.stderr  # argparse's "invalid <helper> value"
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"shmstore {shmstore.__version__}"


def test_stat_shows_readable_times(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        empty = cli("stat", store_name).stdout
        assert re.search(r"last_update_ns\s+0  \(never\)", empty), empty
        st.set(1)
        text = cli("stat", store_name).stdout
        pattern = r"{}\s+{}  \(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}} UTC, \d+s ago\)"
        assert re.search(pattern.format("created_ns", st.created_ns), text), text
        assert re.search(pattern.format("last_update_ns", st.last_update_ns), text), text
        data = json.loads(cli("stat", store_name, "--json").stdout)
        assert data["created_ns"] == st.created_ns  # raw numbers stay for programs
        assert data["created_utc"].endswith(" UTC")


def test_ls_marks_a_cut_type_name(store_name: str) -> None:
    long_type = dict[str, list[tuple[int, int, int, int]]]
    with Store.create(store_name, long_type) as st:
        (line,) = [x for x in cli("ls").stdout.splitlines() if x.startswith(store_name + " ")]
        shown = line[29:61].rstrip()
        assert len(st.type_name) > 32
        assert shown == st.type_name[:29] + "..."


@pytest.mark.parametrize("verb", ["ls", "stat", "get", "watch", "set", "rm", "gc", "demo", "bench"])
def test_every_verb_has_help(verb: str) -> None:
    result = cli(verb, "--help")
    assert result.returncode == 0
    assert "usage: shmstore" in result.stdout


def test_rm_removes_everything(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        with pytest.raises(TimeoutError):
            st.wait(0, timeout=0.01)  # creates a reader semaphore too
    assert objects_of(store_name)  # the segment and the semaphore
    assert cli("rm", store_name).returncode == 0
    assert not objects_of(store_name)
    with pytest.raises(shmstore.StoreNotFoundError):
        Store.open(store_name)


def test_watch_prints_each_version_and_leaves_nothing_on_ctrl_c(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(10)
        with spawned(with_ctrl_c(SCRIPT, "watch", store_name)) as proc:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()) == {"version": 1, "value": 10}
            wait_for_registrations(st, 1)
            st.set(11)
            st.set(12)
            assert json.loads(proc.stdout.readline()) == {"version": 2, "value": 11}
            assert json.loads(proc.stdout.readline()) == {"version": 3, "value": 12}
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=JOIN)
            assert proc.returncode == 130
            assert "Traceback" not in err
            assert st.statistics().readers_registered == 0  # it unregistered on the way out


def _abandon_after_a_crash(name: str) -> None:
    """A store whose reader was SIGKILLed while registered, and that nobody has open now."""
    ctx = mp.get_context("spawn")
    with Store.create(name, int) as st:
        victim = ctx.Process(target=block_forever_in_wait, args=(name,))
        victim.start()
        wait_for_registrations(st, 1)
        victim.kill()
        victim.join(JOIN)


def test_gc_removes_abandoned_stores_and_keeps_the_rest(store_name: str) -> None:
    kept, crashed = store_name + "-kept", store_name + "-crashed"
    scope = ("--prefix", store_name)  # never touch other programs' stores from a test
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=create_and_leave, args=(kept,))  # closed cleanly on purpose
    p.start()
    p.join(JOIN)
    try:
        _abandon_after_a_crash(crashed)
        with Store.create(store_name, int):  # in use by this process
            dry = cli("gc", *scope)
            assert dry.returncode == 0, dry.stderr
            assert f"would remove store {crashed!r}: abandoned: 1 reader(s) died" in dry.stdout
            assert f"keeping store {kept!r}: unused" in dry.stdout
            assert f"{store_name!r}" not in dry.stdout  # in use: not even considered
            Store.open(crashed).close()  # a dry run removes nothing

            done = cli("gc", "--yes", *scope)
            assert done.returncode == 0, done.stderr
            assert f"removing store {crashed!r}" in done.stdout
            assert not objects_of(crashed)  # segment and its dead reader's semaphore
            Store.open(kept).close()
            Store.open(store_name).close()

            young = cli("gc", "--yes", "--older-than", "1h", *scope)
            assert f"keeping store {kept!r}" in young.stdout
            everything = cli("gc", "--all", *scope)
            assert f"would remove store {kept!r}: unused, idle for" in everything.stdout
            old = cli("gc", "--yes", "--older-than", "0s", *scope)
            assert f"removing store {kept!r}: idle for" in old.stdout
            assert not objects_of(kept)
            Store.open(store_name).close()  # still there: in use all along
    finally:
        shmstore.remove(kept)
        shmstore.remove(crashed)


def test_gc_verdict_and_durations() -> None:
    def stats(
        registered: int, alive: int, created_s: float, updated_s: float = 0, locked: bool = False
    ) -> Any:
        return SimpleNamespace(
            readers_registered=registered,
            readers_alive=alive,
            writer_lock_held=locked,
            created_ns=int(created_s * 1e9),
            last_update_ns=int(updated_s * 1e9),
        )

    now = int(10_000 * 1e9)
    assert gc_verdict(stats(2, 0, 9_000), now_ns=now).remove  # dead readers: abandoned
    idle = stats(0, 0, 1_000, updated_s=9_000)  # created long ago, but committed 1000 s ago
    assert not gc_verdict(idle, now_ns=now).remove
    assert not gc_verdict(idle, older_than=1_001, now_ns=now).remove
    assert gc_verdict(idle, older_than=999, now_ns=now).remove
    assert gc_verdict(idle, everything=True, now_ns=now).remove
    # In use, whatever /proc showed (another PID namespace): never removed, not even by --all.
    for busy in (stats(3, 1, 1_000), stats(0, 0, 1_000, locked=True)):
        verdict = gc_verdict(busy, older_than=0, everything=True, now_ns=now)
        assert (verdict.remove, verdict.in_use) == (False, True)
        assert verdict.reason.startswith("in use: ")
    assert [parse_duration(t) for t in ("90", "90s", "30m", "1.5h", "7d")] == [
        90,
        90,
        1800,
        5400,
        604800,
    ]
    for bad in ("", "-1s", "5x", "nan", "inf", "1e400d"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_a_stray_semaphore_is_garbage_only_when_nobody_has_it_open(store_name: str) -> None:
    # A semaphore of a store whose segment is gone, that no process has open: garbage.
    stray = posix_ipc.Semaphore(
        semaphore_prefix(store_name + "-gone") + "zzzzzzz", posix_ipc.O_CREX
    )
    stray.close()
    stray_file = "sem." + stray.name.lstrip("/")
    try:
        with Store.create(store_name, int) as st:
            with pytest.raises(TimeoutError):
                st.wait(0, timeout=0.01)  # registers: this handle holds a semaphore open
            (held,) = [n for n in objects_of(store_name) if n.startswith("sem.")]
            st.unlink()  # the segment is gone, the handle keeps working
            orphans = find_orphans()
            assert stray_file in orphans.stray_semaphores
            assert held not in orphans.stray_semaphores  # still open here: not garbage
    finally:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(stray.name)


LEFTOVERS = """
import mmap, os, subprocess, sys
import posix_ipc
from shmstore import Store
from shmstore._names import segment_name

def segment(name):
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)
    mapped = mmap.mmap(shm.fd, 4096)
    shm.close_fd()
    return mapped

# A store removed by a process killed halfway: its grown ring and its type record are left.
segment(segment_name("gone") + ".gabcdef").close()
segment(segment_name("gone") + ".s0").close()
# Another removed store's ring that a live handle still maps: not garbage.
held = segment(segment_name("gone-but-held") + ".gzzzzzz")
with Store.create("live", int) as st:
    st.set(1)
    segment(segment_name("live") + ".s7").close()  # its store is here: not stray
    for args in (["gc"], ["gc", "--yes"]):
        done = subprocess.run([sys.argv[1], *args], capture_output=True, text=True)
        print(done.returncode, done.stdout, done.stderr, sep="\\n")
    print(sorted(os.listdir("/dev/shm")))
    st.unlink()  # and its type records, .s7 too
held.close()
posix_ipc.unlink_shared_memory(segment_name("gone-but-held") + ".gzzzzzz")
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare"
)
def test_gc_removes_the_rings_and_type_records_of_removed_stores() -> None:
    """In a private ``/dev/shm`` (a mount namespace with a tmpfs), so that ``gc --yes`` touches
    nothing of this machine's; the process namespace is the host's, so gc sees every process."""
    from shmstore._names import segment_name  # noqa: PLC0415

    mount = "mount -t tmpfs -o size=8m tmpfs /dev/shm"
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f'{mount} && exec "$@"', "sh",
         sys.executable, "-c", LEFTOVERS, str(Path(sys.executable).parent / "shmstore")],
        capture_output=True, text=True, timeout=HANG, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    gone = segment_name("gone").lstrip("/")
    for leftover in (f"{gone}.gabcdef", f"{gone}.s0"):
        assert f"would remove segment {leftover}: its store is gone" in result.stdout
        assert f"removing segment {leftover}: its store is gone" in result.stdout
    held = segment_name("gone-but-held").lstrip("/") + ".gzzzzzz"
    live = segment_name("live").lstrip("/")
    assert held not in result.stdout.split("[")[0]  # not offered: a process maps it
    assert f"{live}.s7" not in result.stdout.split("[")[0]
    listing = result.stdout[result.stdout.rindex("[") :]
    assert f"{gone}." not in listing
    assert held in listing
    assert f"{live}.s7" in listing


def test_bench_runs_the_benchmark_programs() -> None:
    """Keeps the benchmarks from rotting: structure, not timings."""
    core = cli("bench", "core", "--", "--calls", "200", "--rounds", "1", timeout=HANG)
    assert core.returncode == 0, core.stderr[-2000:]
    for case in ("small", "fsm", "64k"):
        assert f"\n{case} " in core.stdout
    assert "get() changed" in core.stdout
    wake = cli("bench", "wake", "--", "--rounds", "200", "--fanout-commits", "20", timeout=HANG)
    assert wake.returncode == 0, wake.stderr[-2000:]
    assert "multiprocessing.Queue" in wake.stdout
    assert "fan-out" in wake.stdout


def test_harness_quick_run_structure(tmp_path: Path) -> None:
    """The peer harness on tiny cases in two passes: output and JSON structure, never timings."""
    out = tmp_path / "h.json"
    result = cli(
        "bench",
        "harness",
        "--",
        "--quick",
        "--scenarios",
        "read_changed,wake",
        "--systems",
        "shmstore,multiprocessing.Queue",
        "--sizes",
        "100B",
        "--passes",
        "2",
        "--json",
        str(out),
        timeout=HANG,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "read_changed: median per operation" in result.stdout
    assert "wake: median per operation" in result.stdout
    data = json.loads(out.read_text())
    assert {"machine", "results", "skipped"} <= set(data)
    cases = {(r["scenario"], r["system"], r["size"]) for r in data["results"]}
    assert cases == {
        ("read_changed", "shmstore", "100B"),
        ("wake", "shmstore", "100B"),
        ("wake", "multiprocessing.Queue", "100B"),
    }
    for r in data["results"]:
        assert r["median_ns"] > 0
        assert len(r["pass_medians_ns"]) == 2  # one result per case, over its two passes
        assert min(r["pass_medians_ns"]) <= r["median_ns"] <= max(r["pass_medians_ns"])
        assert len(r["round_medians_ns"]) == 2 * 3
        if r["scenario"] == "wake":
            assert r["p50_ns"] <= r["p99_ns"] <= r["p999_ns"]
    assert "msgspec" in data["machine"]["packages"]


def test_harness_contention_scenarios_structure(tmp_path: Path) -> None:
    """Read-modify-write, fan-out and throughput on shmstore alone: structure and the invariants
    that must hold (no lost update, no torn read), never timings."""
    out = tmp_path / "c.json"
    result = cli(
        "bench",
        "harness",
        "--",
        "--quick",
        "--scenarios",
        "rmw,fanout,throughput",
        "--systems",
        "shmstore",
        "--sizes",
        "100B",
        "--json",
        str(out),
        timeout=HANG,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())["results"]
    rmw = [r for r in data if r["scenario"] == "rmw"]
    assert sorted(r["writers"] for r in rmw) == [1, 2, 4]
    assert all(r["lost_updates"] == 0 for r in rmw)
    assert sorted(r["readers"] for r in data if r["scenario"] == "fanout") == [1, 2, 4, 8]
    (tp,) = [r for r in data if r["scenario"] == "throughput"]
    assert tp["torn_reads"] == 0
    assert tp["commits_per_s"] > 0
    # Not > 0: on a loaded machine the polling readers may not be scheduled before the short
    # quick-mode window closes. A structural check only, like the rest.
    assert tp["reads_per_s"] >= 0


# ---------------------------------------------------------------------------- other users
# The suite runs as root. The interpreter lives under /root (mode 0700), so another user cannot
# exec the console script; instead a spawned child reads the script and imports its modules,
# drops to NOBODY and runs the script's own code: the real entry point, as that user.

NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: switching to another user is what is tested"
)


def _as_nobody(argv: list[str], out: str, err: str) -> None:
    import shmstore._cli  # noqa: F401, PLC0415 -- imported before /root becomes unreadable

    script = compile(Path(SCRIPT).read_text(), SCRIPT, "exec")
    os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    sys.argv = [SCRIPT, *argv]
    exec(script, {"__name__": "__main__"})


def cli_as_nobody(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    out, err = tmp_path / "out", tmp_path / "err"
    p = mp.get_context("spawn").Process(target=_as_nobody, args=(list(argv), str(out), str(err)))
    p.start()
    p.join(JOIN)
    assert p.exitcode is not None, "the CLI run as nobody hung"
    return subprocess.CompletedProcess(argv, p.exitcode, out.read_text(), err.read_text())


def _create_as_nobody(name: str) -> None:
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    Store.create(name, int).close()


@needs_root
def test_rm_and_stat_of_another_users_store_are_one_line_errors(
    store_name: str, tmp_path: Path
) -> None:
    with Store.create(store_name, int) as st:  # root's, mode 0600
        st.set(1)
        removed = cli_as_nobody(tmp_path, "rm", store_name)
        assert removed.returncode == 1
        assert "another user" in one_line_error(removed)
        stat = cli_as_nobody(tmp_path, "stat", store_name)
        assert stat.returncode == 1
        assert "cannot open store" in one_line_error(stat)
        assert objects_of(store_name)  # still there
        assert st.get() == 1


@needs_root
def test_root_inspects_and_removes_another_users_store(store_name: str) -> None:
    p = mp.get_context("spawn").Process(target=_create_as_nobody, args=(store_name,))
    p.start()
    p.join(JOIN)
    assert p.exitcode == 0
    assert os.stat(f"/dev/shm/{objects_of(store_name).pop()}").st_uid == NOBODY
    stat = cli("stat", store_name, "--json")
    assert stat.returncode == 0, stat.stderr
    assert json.loads(stat.stdout)["version"] == 0
    refused = cli("set", store_name, "1", "--type", "builtins:int")  # writing needs the owner
    assert refused.returncode == 1
    assert "owned by uid 65534" in one_line_error(refused)
    assert cli("rm", store_name).returncode == 0
    assert not objects_of(store_name)


def test_an_unexpected_error_is_still_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last line of defence, in-process: a bug of ours must not greet an operator with a
    traceback, but a developer can ask for it."""
    from shmstore import _cli  # noqa: PLC0415

    def broken(_args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(_cli, "cmd_ls", broken)
    assert _cli.main(["ls"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "shmstore: internal error: RuntimeError: a bug "
        "(SHMSTORE_TRACEBACK=1 shows where; please report it)\n"
    )
    monkeypatch.setenv("SHMSTORE_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        _cli.main(["ls"])
