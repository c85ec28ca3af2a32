"""Issue 21's rolling upgrade, end to end in real processes: a writer and three readers on V1; a
new writer evolves the store to V2 (one added field with a default) and commits; the V1 readers,
never restarted, read every version as V1; a V2 reader started after sees the new field; the old
V1 writer's set() is refused and nothing is lost; a V1 reader started after the evolution reads;
then V3 removes a defaulted field and the V1 and V2 readers still read."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any

from evolve_workers import V1, late_reader, subscriber, writer

from shmstore import Store

ctx = mp.get_context("spawn")
WAIT = 60  # seconds: hang detectors, not performance bounds
FINAL = 13


def _wait(event: Any, procs: list[Any]) -> None:
    deadline = time.monotonic() + WAIT
    while not event.wait(0.2):
        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        assert not dead, f"worker died: exit codes {dead}"
        assert time.monotonic() < deadline, "worker did not get there in time"


def _collect(results: Any, procs: list[Any], n: int) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + WAIT * 2
    while len(got) < n:
        try:
            item = results.get(timeout=0.2)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"worker died: exit codes {dead}"
            assert time.monotonic() < deadline, "workers did not report in time"
            continue
        assert item[0] != "error", item[1]
        got.append(item)
    return got


def test_rolling_upgrade_across_processes(store_name: str) -> None:
    results = ctx.Queue()
    procs: list[Any] = []

    def start(target: Any, *args: Any) -> None:
        p = ctx.Process(target=target, args=(*args, results))
        p.start()
        procs.append(p)

    try:
        with Store.create(store_name, V1, slots=64) as creator:
            for i in range(3):
                ready = ctx.Event()
                start(subscriber, store_name, "V1", FINAL, ready, f"V1-reader-{i}")
                _wait(ready, procs)
            # The old writer: versions 1-5 as V1; it stays open across the evolution.
            wrote_v1, try_again = ctx.Event(), ctx.Event()
            start(writer, store_name, "V1", 1, 5, False, wrote_v1, try_again)
            _wait(wrote_v1, procs)
            # A new writer evolves the store to V2 and commits 6-10.
            wrote_v2 = ctx.Event()
            start(writer, store_name, "V2", 6, 10, True, wrote_v2, None)
            _wait(wrote_v2, procs)
            assert creator.schema_generation == 1
            # A V2 reader started after the evolution.
            ready = ctx.Event()
            start(subscriber, store_name, "V2", FINAL, ready, "V2-reader")
            _wait(ready, procs)
            # The old V1 writer tries again: refused, nothing lost.
            try_again.set()
            # A V1 reader started after the evolution.
            start(late_reader, store_name, "V1")
            # V3 removes V1/V2's defaulted `label` and commits 11-13.
            wrote_v3 = ctx.Event()
            start(writer, store_name, "V3", 11, FINAL, True, wrote_v3, None)
            _wait(wrote_v3, procs)
            got = _collect(results, procs, len(procs))
            for p in procs:
                p.join(WAIT)
                assert p.exitcode == 0
            assert creator.schema_generation == 2
            assert creator.get() == V1("v13", 13, "")  # the creator's V1 handle, never reopened
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

    by_kind: dict[str, list[Any]] = {}
    for item in got:
        by_kind.setdefault(item[0], []).append(item)
    (refused,) = by_kind["refused"]
    _, message, unchanged = refused
    assert "evolved to evolve_workers:V" in message, message
    assert "'note'" in message, message  # the field its values would drop
    assert unchanged
    writers = sorted(item[1] for item in by_kind["wrote"])
    assert writers == ["V2", "V3"]
    (late,) = by_kind["late"]
    assert late[1:3] == ("V1", "V1")
    assert late[4] >= 10
    assert set(late[3]) == {"name", "count", "label"}

    reads = {item[1]: item for item in by_kind["read"]}
    assert set(reads) == {"V1-reader-0", "V1-reader-1", "V1-reader-2", "V2-reader"}
    for tag, (_, _, seen, newest, projected, version) in reads.items():
        assert [v for v, _, _ in seen] == list(range(1, FINAL + 1)), tag  # every version
        assert version == FINAL
        assert newest == projected
        for v, type_name, value in seen:
            assert value["count"] == v
            assert value["name"] == f"v{v}"
            assert value["label"] == (f"L{v}" if v <= 10 else "")  # V3 dropped it: the default
            if tag.startswith("V1"):
                assert type_name == "V1"
                assert set(value) == {"name", "count", "label"}
            else:
                assert type_name == "V2"
                assert value["note"] == ("n/a" if v <= 5 else f"N{v}")
