"""Projection reads against a real writer process: the walk runs on the live mapping (the
values are past the in-place threshold) while the writer rewrites it, and every head it
returns must be one the writer committed."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import time
from typing import Any

from projection_workers import Entry, entry_writer, projection_reader

from shmstore import Store

ctx = mp.get_context("spawn")
JOIN = 120  # seconds: a hang detector, not a performance bound


def run(store_name: str, readers: int, seconds: float, control: bool) -> list[Any]:
    """Readers against a writer for *seconds*; their (reads, bad, distinct)."""
    # Two slots: the writer laps a reader's slot every second commit.
    with Store.create(store_name, Entry, slots=2, slot_size=16384):
        start = ctx.Barrier(readers + 1)
        stop = ctx.Event()
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=projection_reader,
                args=(store_name, start, results, seconds),
                kwargs={"control": control},
            )
            for _ in range(readers)
        ]
        procs.append(ctx.Process(target=entry_writer, args=(store_name, 64, start, stop)))
        for p in procs:
            p.start()
        stats: list[Any] = []
        deadline = time.monotonic() + JOIN
        try:
            while len(stats) < readers:
                assert time.monotonic() < deadline, "readers did not report in time"
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"worker died: exit codes {dead}"
                with contextlib.suppress(queue.Empty):
                    stats.append(results.get(timeout=0.2))
        finally:
            stop.set()
            for p in procs:
                p.join(JOIN)
        assert [p.exitcode for p in procs] == [0] * len(procs)
    return stats


def test_projection_reads_are_never_torn(store_name: str) -> None:
    for reads, bad, distinct in run(store_name, readers=2, seconds=4.0, control=False):
        assert bad == 0
        assert reads > 0
        assert distinct > 10  # the store changed under the reader


def test_negative_control_detects_torn_walks_without_the_recheck(store_name: str) -> None:
    """The same readers with the re-check off, lapped mid-read, must see a bad head: this is
    what proves the test above could fail."""
    ((reads, bad, _distinct),) = run(store_name, readers=1, seconds=60.0, control=True)
    assert reads > 0
    assert bad > 0, "the checker saw no torn head even with the re-check disabled"
