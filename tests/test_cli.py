"""The ``shmstore`` console script, run for real in subprocesses."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_multiprocess import JOIN
from test_waiting import wait_for_registrations
from workers import Point, create_and_leave

import shmstore
from shmstore import Store

SCRIPT = str(Path(sys.executable).parent / "shmstore")
TESTS = str(Path(__file__).parent)


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": TESTS}
    return subprocess.run(
        [SCRIPT, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


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
        refused = cli("set", store_name, '{"x": 1, "y": 2}')
        assert refused.returncode == 1
        assert "--type" in one_line_error(refused)
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
    assert cli("get", "bad/name").returncode == 1
    assert cli("frobnicate").returncode == 2


@pytest.mark.parametrize("verb", ["ls", "stat", "get", "watch", "set", "rm", "gc", "demo", "bench"])
def test_every_verb_has_help(verb: str) -> None:
    result = cli(verb, "--help")
    assert result.returncode == 0
    assert "usage: shmstore" in result.stdout


def test_rm_removes_everything(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        with pytest.raises(TimeoutError):
            st.wait(0, timeout=0.01)  # creates a reader semaphore too
    assert cli("rm", store_name).returncode == 0
    assert not [p for p in Path("/dev/shm").iterdir() if store_name in p.name]
    with pytest.raises(shmstore.StoreNotFoundError):
        Store.open(store_name)


def test_watch_prints_each_version_and_leaves_nothing_on_ctrl_c(store_name: str) -> None:
    with Store.create(store_name, int) as st:
        st.set(10)
        proc = subprocess.Popen(
            [SCRIPT, "watch", store_name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
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
        assert st._registry.entries() == []


def test_gc_removes_only_what_no_process_uses(store_name: str) -> None:
    orphan = store_name + "-orphan"
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=create_and_leave, args=(orphan,))
    p.start()
    p.join(JOIN)
    try:
        with Store.create(store_name, int):  # in use by this process
            dry = cli("gc")
            assert dry.returncode == 0, dry.stderr
            assert f"would remove store {orphan!r}" in dry.stdout
            assert store_name + "'" not in dry.stdout
            Store.open(orphan).close()  # dry run removed nothing
            done = cli("gc", "--yes")
            assert done.returncode == 0
            assert f"removing store {orphan!r}" in done.stdout
            with pytest.raises(shmstore.StoreNotFoundError):
                Store.open(orphan)
            Store.open(store_name).close()  # still there
    finally:
        shmstore.remove(orphan)


def test_bench_runs_the_benchmark_programs() -> None:
    """Keeps the benchmarks from rotting: structure, not timings."""
    core = cli("bench", "core", "--", "--calls", "200", "--rounds", "1")
    assert core.returncode == 0, core.stderr[-2000:]
    for case in ("small", "fsm", "64k"):
        assert f"\n{case} " in core.stdout
    assert "get() changed" in core.stdout
    wake = cli("bench", "wake", "--", "--rounds", "200", "--fanout-commits", "20")
    assert wake.returncode == 0, wake.stderr[-2000:]
    assert "multiprocessing.Queue" in wake.stdout
    assert "fan-out" in wake.stdout


def test_harness_quick_run_structure(tmp_path: Path) -> None:
    """The peer harness on one tiny case: output and JSON structure, never timings."""
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
        "--json",
        str(out),
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
        assert len(r["round_medians_ns"]) == 3
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
    assert tp["reads_per_s"] > 0
