"""Process entry points for the projection torture tests (importable by spawned children).

Values are self-checking in their head: ``note`` and ``pad`` are derived from ``seq`` and change
length on every commit (so every later offset moves), and ``check`` ties them together. A big
``tail`` after them puts every payload past the in-place threshold, so readers walk the live
mapping while the writer rewrites it.
"""

from __future__ import annotations

import os
import time
import zlib
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import msgspec

from shmstore import CorruptStoreError, Store, _ring
from shmstore._projection import projection_decoder

BARRIER_WAIT = 60  # a dead sibling must fail the test, not hang it


class Entry(msgspec.Struct, frozen=True):
    seq: int
    note: str
    pad: bytes
    check: int
    tail: list[int]


class EntryHead(msgspec.Struct, frozen=True):
    seq: int
    note: str
    check: int


def make_entry(seq: int) -> Entry:
    note = f"é{seq}" * (1 + seq % 40)
    pad = bytes([seq % 256]) * (seq * 7919 % 300)
    check = zlib.crc32(note.encode()) ^ seq
    return Entry(seq, note, pad, check, list(range(seq % 1000, seq % 1000 + 2000)))


def head_ok(head: Any) -> bool:
    if not isinstance(head, EntryHead):
        return False
    n = 1 + head.seq % 40
    return head.note == f"é{head.seq}" * n and head.check == zlib.crc32(head.note.encode()) ^ (
        head.seq
    )


def entry_writer(name: str, payloads: int, start: Barrier, stop: Event) -> None:
    """Commits ``make_entry(v)`` cycling through *payloads* precomputed values until *stop*."""
    st = Store.open(name, Entry)
    values = [make_entry(s) for s in range(1, payloads + 1)]
    start.wait(BARRIER_WAIT)
    try:
        while not stop.is_set():
            for value in values:
                st.set(value)
    finally:
        st.close()


def projection_reader(
    name: str, start: Barrier, results: Any, seconds: float, *, control: bool = False
) -> None:
    """Read the projection for *seconds*; report (reads, bad, distinct): bad counts heads
    that do not check and reads that failed.

    With *control* (the negative control) the seq re-check is off, each read goes through the
    same seqlock read as ``Projection.get`` but yields the CPU after taking the first bytes of
    the head (so the writer can lap it there), and the reader stops at its first bad head
    after a good read (or at *seconds*)."""
    st = Store.open(name, Entry)
    view = st.projection(EntryHead)
    walk = projection_decoder(EntryHead, walk_min=0)

    def halting_walk(data: bytes | memoryview) -> EntryHead:
        first = bytes(data[:12])  # the seq entry and the start of the note's
        os.sched_yield()  # the writer may lap us right here
        return walk(first + bytes(data[12:]))

    def read() -> EntryHead | None:
        if not control:
            return view.get()
        try:
            return st._ring.read_newest_value(halting_walk, True)[0]
        except _ring.DecodeFailed as failed:
            raise CorruptStoreError(str(failed)) from failed

    st._ring.verify = not control
    reads = bad = 0
    seen: set[int] = set()
    start.wait(BARRIER_WAIT)
    give_up = time.monotonic() + seconds
    try:
        while time.monotonic() < give_up and not (control and bad and reads):
            try:
                head = read()
            except CorruptStoreError:
                bad += 1
                continue
            if head is None:
                continue
            reads += 1
            if head_ok(head):
                seen.add(head.seq)
            else:
                bad += 1
    finally:
        st.close()
    results.put((reads, bad, len(seen)))
