"""Values that grow: moving a store to a larger ring without stopping its readers or writers.

A store is created with a small slot capacity (``slot_size``) and may grow up to its
``max_value_size``. When a commit's encoded value does not fit, the writer -- holding the writer
lock -- moves the store to a ring with larger slots, then commits there.

Where things live
-----------------
The store's own segment (its name) keeps everything that identifies and coordinates the store:
the header with HEAD and the counters, the reader registry, the writer mutex -- and the first
ring (generation 0). A ring the store grew into is a segment of its own, ``<name>.g<g>``
(``_names.generation_segment_name``), holding a small self-describing header and the slots. The
header word GENERATION names the ring that accepts commits. Because HEAD, the registry and the
lock never move, waiting, waking and compare-and-set are untouched by a move, and the reader's
fast path (an unchanged ``get()``: one load of HEAD and a compare) does not look at GENERATION at
all.

The move (writer, under the writer lock)
----------------------------------------
1. Create segment ``g+1`` (``O_EXCL``; a leftover of a writer that died during an earlier move
   is removed first) with slots of the capacity doubled until the value fits -- geometric, so
   repeated growth costs amortised O(1) copies per byte -- capped at ``max_value_size``.
2. Copy every version the old ring still holds (the newest ``slots`` ones) into the same slots of
   the new ring, so that a subscriber behind by less than ``slots`` versions loses nothing.
3. Publish the new segment's magic, then store GENERATION = g+1 (one aligned 8-byte store).
4. Remove the names of older generations (never generation 0, the store itself): a handle that
   still maps one keeps its mapping, as POSIX allows, and finds the newer ring through GENERATION.
5. Commit the value into the new ring as usual: slot, then HEAD.

Why readers cannot go wrong
---------------------------
After step 3 nothing is ever written to the old ring again: every writer checks GENERATION under
the writer lock before it commits and follows a move first, so there are never two rings that
accept commits. A version that the old ring holds is therefore still correct there, forever; a
version committed after the move is not in the old ring, so its slot's sequence word never
matches and the seqlock read fails -- that failure is when a reader looks at GENERATION, maps the
newer ring and reads again (``Ring.read_newest`` raises ``RingMoved``). Old-ring readers are thus
forced onto their slow path by the protocol itself; nobody checks a flag on every read.

A writer killed at any step leaves a readable store at its last committed version: before step 3
only an unpublished segment exists (the next mover removes and recreates it); after step 3 the
new ring holds every version the old one did; before step 5 HEAD has not moved. ``remove()``
removes every generation that may exist (``<name>.g1`` ... ``g<GENERATION+1>``, and on Linux every
``<name>.g*`` file), so nothing is left behind.

Open questions: a private store (``Store.private``) grows into anonymous segments, which a forked
child cannot find; such a child must not commit values larger than the ring it inherited.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Final

from ._errors import StoreExistsError, StoreNotFoundError
from ._layout import (
    GEN_HEADER_SIZE,
    Geometry,
    generation_size,
    publish_generation,
    read_generation_header,
    write_generation_header,
)
from ._names import generation_segment_name, segment_name
from ._ring import Ring
from ._segment import Segment, unlink_segment

__all__ = [
    "GROWTH_FACTOR",
    "grow",
    "next_capacity",
    "open_generation",
    "remove_listed_generations",
    "unlink_generations",
]

GROWTH_FACTOR: Final = 2


def next_capacity(current: int, needed: int, limit: int) -> int:
    """The slot capacity to grow to: *current* doubled until it holds *needed*, at most
    *limit*. Doubling (rather than growing to exactly what is needed) is what keeps a value
    that grows a little at a time from moving the store at every commit."""
    capacity = max(current, 1)
    while capacity < needed:
        capacity *= GROWTH_FACTOR
    return min(limit, capacity)


def _create(
    name: str,
    generation: int,
    slots: int,
    slot_size: int,
    *,
    mode: int,
    group: int | None,
    private: bool,
) -> Segment:
    size = generation_size(slots, slot_size)
    if private:
        return Segment.anonymous(f"{name}.g{generation}", size)
    os_name = generation_segment_name(name, generation)
    try:
        return Segment.create(name, size, mode, group, os_name=os_name)
    except StoreExistsError:
        # A writer died during an earlier move to this generation, before publishing it.
        unlink_segment(name, os_name=os_name)
        return Segment.create(name, size, mode, group, os_name=os_name)


def _ring_over(
    root: mmap.mmap,
    geometry: Geometry,
    segment: Segment,
    generation: int,
    capacity: int,
    *,
    crc: bool,
    reuse_buffer: bool,
) -> Ring:
    """The ring of generation *generation*: HEAD and counters in *root*, slots in *segment*."""
    return Ring(
        root,
        geometry,
        crc=crc,
        reuse_buffer=reuse_buffer,
        generation=generation,
        slots=(segment.map, GEN_HEADER_SIZE, capacity),
    )


def grow(
    root: mmap.mmap,
    geometry: Geometry,
    old: Ring,
    *,
    name: str,
    capacity: int,
    mode: int,
    group: int | None = None,
    crc: bool,
    reuse_buffer: bool,
    private: bool,
) -> tuple[Ring, Segment]:
    """Move the store to a ring of *capacity* bytes per slot, steps 1-4 of the module essay.
    The new segment gets the store's *mode* and *group* (gid), so that whoever may read the
    store may read its new ring.
    The caller holds the writer lock, commits into the returned ring, and keeps the old ring
    mapped until it closes (other threads of its handle may be reading it)."""
    generation = old.generation + 1
    segment = _create(
        name, generation, geometry.slots, capacity, mode=mode, group=group, private=private
    )
    ring = None
    try:
        write_generation_header(segment.map, generation, geometry.slots, capacity)
        ring = _ring_over(
            root, geometry, segment, generation, capacity, crc=crc, reuse_buffer=reuse_buffer
        )
        head = old.head()
        for version in range(max(1, head - geometry.slots + 1), head + 1):
            got = old.read(version)
            if got is not None:
                ring.write_slot(version, got[0], got[1])
        publish_generation(segment.map)
        ring.take_over()
    except BaseException:
        if ring is not None:
            ring.release()
        segment.close()
        if not private:
            unlink_segment(name, os_name=generation_segment_name(name, generation))
        raise
    if not private:
        unlink_generations(name, range(1, generation))
    return ring, segment


def open_generation(
    root: mmap.mmap,
    geometry: Geometry,
    name: str,
    generation: int,
    *,
    crc: bool,
    reuse_buffer: bool,
    readonly: bool | None = None,
) -> tuple[Ring, Segment]:
    """Map generation *generation* of store *name* (read-only with *readonly*, as
    :meth:`Segment.open` takes it). Raises :class:`StoreNotFoundError` when its name is gone (a
    newer move removed it: read GENERATION again)."""
    segment = Segment.open(
        name, readonly=readonly, os_name=generation_segment_name(name, generation)
    )
    try:
        capacity = read_generation_header(segment.map, segment.size, generation, geometry.slots)
        ring = _ring_over(
            root, geometry, segment, generation, capacity, crc=crc, reuse_buffer=reuse_buffer
        )
    except BaseException:
        segment.close()
        raise
    return ring, segment


def unlink_generations(name: str, generations: range) -> None:
    """Remove the names of these generations of store *name*, where they exist."""
    for generation in generations:
        with contextlib.suppress(StoreNotFoundError):
            unlink_segment(name, os_name=generation_segment_name(name, generation))


def remove_listed_generations(name: str) -> None:
    """On Linux, segments are files in /dev/shm: remove every generation of the store,
    including leftovers of moves that died."""
    prefix = segment_name(name).lstrip("/") + ".g"
    try:
        listing = os.listdir("/dev/shm")
    except OSError:
        return
    for entry in listing:
        if entry.startswith(prefix) and entry[len(prefix) :].isdigit():
            unlink_segment(name, os_name="/" + entry)
