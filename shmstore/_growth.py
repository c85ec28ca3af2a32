"""Values that grow: moving a store to a larger ring without stopping its readers or writers.

A store is created with a small slot capacity (``slot_size``) and may grow up to its
``max_value_size``. When a commit's encoded value does not fit, the writer -- holding the writer
lock -- moves the store to a ring with larger slots, then commits there.

Where things live
-----------------
The store's own segment (its name) keeps everything that identifies and coordinates the store:
the header with HEAD and the counters, the reader registry, the writer mutex -- and the first
ring (generation 0). A ring the store grew into is a segment of its own, named after the store,
its *incarnation* (the header's ``created`` word) and the generation ``g``: ``<name>.g<tag>``
(``_names.generation_segment_name``), holding a small self-describing header -- which repeats
the incarnation -- and the slots. The header word GENERATION names the ring that accepts
commits. Because HEAD, the registry and the lock never move, waiting, waking and compare-and-set
are untouched by a move, and the reader's fast path (an unchanged ``get()``: one load of HEAD and
a compare) does not look at GENERATION at all.

The move (writer, under the writer lock)
----------------------------------------
1. Create segment ``g+1`` (``O_EXCL``; a leftover of a writer of this incarnation that died
   during an earlier move is removed first, see "Whose ring" below) with slots of the capacity
   doubled until the value fits -- geometric, so repeated growth costs amortised O(1) copies
   per byte -- capped at ``max_value_size``.
2. Copy every version the old ring still holds (the newest ``slots`` ones) into the same slots of
   the new ring, so that a subscriber behind by less than ``slots`` versions loses nothing.
3. Publish the new segment's magic, then store GENERATION = g+1 (one aligned 8-byte store).
4. Remove the names of this incarnation's older generations (never generation 0, the store
   itself): a handle that still maps one keeps its mapping, as POSIX allows, and finds the newer
   ring through GENERATION.
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
removes every generation that may exist (generations 1 ... GENERATION+1 of the incarnation in the
header, and on Linux every ``<name>.g*`` file), so nothing is left behind.

Whose ring (issue 20)
---------------------
A store's name outlives its incarnations: ``remove()`` and a new ``create()`` give the name a new
store while handles of the old one live on, orphaned, and may still commit -- and grow. Rings
were once named ``<name>.g<g>`` alone, so an orphan that grew found the new store's ring under
"its" next name, took it for a dead writer's leftover, unlinked it and put its own in its place:
new openers read the orphan's value, then ``CorruptStoreError``. Now:

- *Names*: a ring's name hashes the incarnation with the generation, so two incarnations'
  rings have different names (30 bits of blake2b: two incarnations of one name clash at a given
  generation with odds of about 1e-9). An orphan creates and removes only names of its own
  incarnation.
- *Headers*: the ring's header repeats the incarnation. Attaching checks it
  (``read_generation_header``), so even a clash of names can never serve another store's slots.
- *Removing*: a name is unlinked only with proof that it is this incarnation's. Step 1 finds a
  leftover only under a name derived from its own incarnation, and removes it only if its header
  names this incarnation or was never written (the leftover of a mover killed between creating
  the segment and writing its header: then the name is the only proof there is). What remains
  is a clash of names *and* another incarnation's mover caught in those microseconds at once:
  its move would then publish a ring without a name, which its other handles could not follow
  (``CorruptStoreError``, never a wrong value). A ring of another incarnation whose header is
  written is refused (``CorruptStoreError``), never removed. Step 4 and ``remove()`` derive
  older names from the incarnation in the store's own header; ``unlink()`` of an orphaned handle
  removes only its own incarnation's rings and semaphores, and never the name
  (``_provision.remove_orphaned``). ``remove()``/``gc`` of a *name* still remove every
  ``<name>.g*`` on Linux -- that is removing the name for everyone, which the caller asked for.

Open questions: a private store (``Store.private``) grows into anonymous segments, which a forked
child cannot find; such a child must not commit values larger than the ring it inherited.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Final

from ._errors import CorruptStoreError, StoreExistsError, StoreNotFoundError
from ._layout import (
    GEN_HEADER_SIZE,
    Geometry,
    generation_incarnation,
    generation_size,
    publish_generation,
    read_generation_header,
    write_generation_header,
)
from ._names import generation_prefix, generation_segment_name
from ._ring import Ring
from ._segment import Segment, UnsizedSegmentError, unlink_segment

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
    created_ns: int,
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
    os_name = generation_segment_name(name, created_ns, generation)
    try:
        return Segment.create(name, size, mode, group, os_name=os_name)
    except StoreExistsError:
        # A writer of this incarnation died during an earlier move to this generation, before
        # publishing it -- provided the leftover says so ("Whose ring" in the essay).
        _remove_own_leftover(name, created_ns, generation, os_name)
        return Segment.create(name, size, mode, group, os_name=os_name)


def _remove_own_leftover(name: str, created_ns: int, generation: int, os_name: str) -> None:
    try:
        leftover = Segment.open(name, readonly=True, os_name=os_name)
    except StoreNotFoundError:
        return  # gone meanwhile
    except UnsizedSegmentError:
        incarnation = 0  # killed between creating and sizing it: nothing written
    else:
        try:
            incarnation = generation_incarnation(leftover.map, leftover.size)
        finally:
            leftover.close()
    if incarnation not in (0, created_ns):
        raise CorruptStoreError(
            f"store {name!r} cannot grow: the name of its ring generation {generation} is taken "
            f"by a ring of the store created at {incarnation} ns (this one: {created_ns} ns); "
            "it is left alone"
        )
    with contextlib.suppress(StoreNotFoundError):
        unlink_segment(name, os_name=os_name)


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
    created_ns: int,
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
        name,
        created_ns,
        generation,
        geometry.slots,
        capacity,
        mode=mode,
        group=group,
        private=private,
    )
    ring = None
    try:
        write_generation_header(segment.map, generation, geometry.slots, capacity, created_ns)
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
            unlink_segment(name, os_name=generation_segment_name(name, created_ns, generation))
        raise
    if not private:
        unlink_generations(name, created_ns, range(1, generation))
    return ring, segment


def open_generation(
    root: mmap.mmap,
    geometry: Geometry,
    name: str,
    created_ns: int,
    generation: int,
    *,
    crc: bool,
    reuse_buffer: bool,
    readonly: bool | None = None,
) -> tuple[Ring, Segment]:
    """Map generation *generation* of the incarnation of store *name* created at *created_ns*
    (read-only with *readonly*, as :meth:`Segment.open` takes it). Raises
    :class:`StoreNotFoundError` when its name is gone (a newer move removed it: read GENERATION
    again), :class:`CorruptStoreError` when the segment is not that incarnation's ring."""
    segment = Segment.open(
        name, readonly=readonly, os_name=generation_segment_name(name, created_ns, generation)
    )
    try:
        capacity = read_generation_header(
            segment.map, segment.size, generation, geometry.slots, created_ns
        )
        ring = _ring_over(
            root, geometry, segment, generation, capacity, crc=crc, reuse_buffer=reuse_buffer
        )
    except BaseException:
        segment.close()
        raise
    return ring, segment


def unlink_generations(name: str, created_ns: int, generations: range) -> None:
    """Remove the names of these generations of the incarnation of store *name* created at
    *created_ns*, where they exist."""
    for generation in generations:
        with contextlib.suppress(StoreNotFoundError):
            unlink_segment(name, os_name=generation_segment_name(name, created_ns, generation))


def remove_listed_generations(name: str) -> None:
    """On Linux, segments are files in /dev/shm: remove every ring of every incarnation of the
    store *name*, including leftovers of moves that died (removing a name is for everyone)."""
    prefix = generation_prefix(name).lstrip("/")
    try:
        listing = os.listdir("/dev/shm")
    except OSError:
        return
    for entry in listing:
        if entry.startswith(prefix) and entry[len(prefix) :].isalnum():
            with contextlib.suppress(StoreNotFoundError):
                unlink_segment(name, os_name="/" + entry)
