"""Real processes against one store: torn reads, killed writers, cross-process CAS."""

from __future__ import annotations

import multiprocessing as mp
import queue
import random
import signal
import threading
import time
from typing import Any

import pytest
from workers import (
    Rec,
    cas_incrementer,
    looping_writer,
    make_rec,
    raw_writer,
    rec_ok,
    torture_reader,
    torture_writer,
    writer_stopped_at,
)

from shmstore import Store

ctx = mp.get_context("spawn")
JOIN = 120  # seconds: a hang detector, not a performance bound


def collect(results: Any, procs: list[Any], n: int) -> list[Any]:
    """*n* results from the children, failing at once if one of them died instead."""
    got: list[Any] = []
    deadline = time.monotonic() + JOIN
    while len(got) < n:
        try:
            got.append(results.get(timeout=0.2))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"worker died: exit codes {[p.exitcode for p in dead]}"
            assert time.monotonic() < deadline, "workers did not report in time"
    return got


def test_no_torn_reads_under_stress(store_name: str) -> None:
    commits, readers = 50_000, 2
    with Store.create(store_name, Rec, slots=4, slot_size=4096) as st:
        start = ctx.Barrier(readers + 1)
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=torture_reader,
                args=(store_name, commits, start, results),
                kwargs={"recheck": True, "max_blob": 3000},
            )
            for _ in range(readers)
        ]
        procs.append(ctx.Process(target=torture_writer, args=(store_name, commits, start, 3000)))
        for p in procs:
            p.start()
        stats = collect(results, procs, readers)
        for p in procs:
            p.join(JOIN)
            assert p.exitcode == 0
        assert st.get_with_version() == (make_rec(commits), commits)
    for reads, bad, regressions, distinct in stats:
        assert bad == 0
        assert regressions == 0
        assert reads > 0
        assert distinct > 10  # the readers saw the store change under them (few on a busy box)


def test_no_torn_reads_with_large_values(store_name: str) -> None:
    """Values of 260-600 KB take the reusable per-thread copy-out buffer (``_ring``)."""
    commits, readers, max_blob = 3000, 2, 600_000
    with Store.create(store_name, Rec, slots=4, slot_size=max_blob + 100):
        start = ctx.Barrier(readers + 1)
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=torture_reader,
                args=(store_name, commits, start, results),
                kwargs={"recheck": True, "max_blob": max_blob},
            )
            for _ in range(readers)
        ]
        procs.append(
            ctx.Process(
                target=torture_writer,
                args=(store_name, commits, start, max_blob),
                kwargs={"min_blob": 260_000},
            )
        )
        for p in procs:
            p.start()
        stats = collect(results, procs, readers)
        for p in procs:
            p.join(JOIN)
            assert p.exitcode == 0
    for reads, bad, regressions, distinct in stats:
        assert (bad, regressions) == (0, 0)
        assert reads > 0
        assert distinct > 10


def test_negative_control_detects_tearing_without_the_recheck(store_name: str) -> None:
    """Same readers and checks, but the seqlock's re-check is disabled and a fast writer laps
    them: torn copies must be caught, which proves the stress test above can fail."""
    max_blob = 60_000
    with Store.create(store_name, Rec, slots=2, slot_size=65536):
        start = ctx.Barrier(2)
        stop = ctx.Event()
        results = ctx.Queue()
        # The reader stops at its first torn read (on a loaded machine that can take many
        # commits), or after a minute, or at a version the raw writer reaches much later.
        reader = ctx.Process(
            target=torture_reader,
            args=(store_name, 50_000_000, start, results),
            kwargs={"recheck": False, "max_blob": max_blob, "until_bad": True},
        )
        writer = ctx.Process(target=raw_writer, args=(store_name, stop, start, max_blob))
        reader.start()
        writer.start()
        ((reads, bad, _regressions, _distinct),) = collect(results, [reader, writer], 1)
        stop.set()
        reader.join(JOIN)
        writer.join(JOIN)
    assert reads > 0
    assert bad > 0, "the checker saw no torn read even with the re-check disabled"


def _check_after_kill(st: Store[Rec]) -> None:
    rec, version = st.get_with_version()
    if version == 0:
        assert rec is None
        return
    assert rec_ok(rec)
    assert rec is not None
    assert rec.seq == version
    # The kernel dropped the dead writer's flock: a new writer gets in at once.
    assert not st._lock.held_elsewhere()
    committed: list[int] = []
    t = threading.Thread(target=lambda: committed.append(st.set(make_rec(version + 1))))
    t.daemon = True
    t.start()
    t.join(5)
    assert committed == [version + 1], "a new writer could not commit after the kill"


def test_writer_killed_at_random_moments_loses_nothing(store_name: str, writer_lock: str) -> None:
    rng = random.Random(1234)
    with Store.create(store_name, Rec, slots=4, slot_size=4096, writer_lock=writer_lock) as st:
        for _ in range(12):
            ready = ctx.Event()
            p = ctx.Process(target=looping_writer, args=(store_name, ready))
            p.start()
            assert ready.wait(JOIN)
            time.sleep(rng.uniform(0, 0.02))  # where the kill lands, not synchronization
            p.kill()
            p.join(JOIN)
            assert p.exitcode == -signal.SIGKILL
            _check_after_kill(st)


@pytest.mark.parametrize(
    ("function", "marker"),
    [
        ("commit", "self.write_slot(version, payload, ts_ns)"),  # lock held, nothing written
        ("write_slot", "start = base + SLOT_HEADER_SIZE"),  # slot odd, payload not yet written
        ("write_slot", "self._i[word + SLOT_LEN_I]"),  # payload done, length not yet written
        ("commit", "self._q[_HEAD] = version"),  # slot complete and even, HEAD not yet published
        ("commit", "return version"),  # published, not yet returned
    ],
)
def test_writer_killed_at_dangerous_points_loses_nothing(
    store_name: str,
    function: str,
    marker: str,
    writer_lock: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Store.create(store_name, Rec, slots=2, slot_size=4096, writer_lock=writer_lock) as st:
        st.set(make_rec(1))
        st.set(make_rec(2))
        reached = ctx.Event()
        p = ctx.Process(target=writer_stopped_at, args=(store_name, function, marker, reached))
        p.start()
        assert reached.wait(JOIN)
        assert st._lock.held_elsewhere()  # it really is frozen inside the critical section
        p.kill()
        p.join(JOIN)
        published = marker == "return version"
        assert st.version == (3 if published else 2)
        assert st.commits == st.version  # the counters agree with HEAD, whatever the kill point
        assert st.last_update_ns == st._ring.read_newest()[2]
        _check_after_kill(st)
        if writer_lock == "mutex":
            assert "died holding the write lock; recovered" in caplog.text


def test_compare_and_set_across_processes(store_name: str, writer_lock: str) -> None:
    procs_n, per_proc = 3, 400
    with Store.create(store_name, int, writer_lock=writer_lock) as st:
        st.set(0)
        start = ctx.Barrier(procs_n)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=cas_incrementer, args=(store_name, per_proc, start, results))
            for _ in range(procs_n)
        ]
        for p in procs:
            p.start()
        conflicts = [pid_conflicts[1] for pid_conflicts in collect(results, procs, procs_n)]
        for p in procs:
            p.join(JOIN)
            assert p.exitcode == 0
        assert st.get() == procs_n * per_proc
        assert st.version == procs_n * per_proc + 1
        assert st._ring.conflicts() == sum(conflicts)
